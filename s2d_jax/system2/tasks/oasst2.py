"""OASST2 pairwise judging: two ranked sibling assistant replies to the same prompter message, the better-ranked
one preferred. Reads the public flat message format (`2023-11-05_oasst2_ready.messages.jsonl[.gz]`: `message_id`,
`parent_id`, `message_tree_id`, `role`, `text`, `lang`, `rank`, ...) by path; no copy ships with the project.

The question is the whole conversation up to the compared replies (every earlier turn, rendered as MT-bench's
multi-turn prompts write turns); `task.lang` keeps one language (by the prompter message's `lang`); the split is
deterministic by conversation tree: a hash of `message_tree_id` puts 5% of the trees in `heldout` (eval) and the
rest in `train` (the unlabelled pool), so no conversation is in both."""

from __future__ import annotations

import zlib

from s2d_jax.artifacts import read_jsonl
from s2d_jax.errors import S2DError
from s2d_jax.system2.tasks.judge import PairwiseJudge, pair_example

FIELDS = ("message_id", "parent_id", "role", "text")
HELDOUT_PERCENT = 5


def split_of(tree_id: str) -> str:
    return "heldout" if zlib.crc32(tree_id.encode()) % 100 < HELDOUT_PERCENT else "train"


def conversation(by_id: dict, message_id: str) -> list[dict]:
    """The messages from the tree's root to `message_id`, in order."""
    chain, seen = [], set()
    while message_id in by_id and message_id not in seen:
        seen.add(message_id)
        chain.append(by_id[message_id])
        message_id = by_id[message_id]["parent_id"]
    return chain[::-1]


def render_turns(messages: list[dict]) -> str:
    """A conversation as MT-bench's multi-turn judge prompts write it ("### User:" / "### Assistant:")."""
    if len(messages) == 1:
        return messages[0]["text"]
    names = {"prompter": "User", "assistant": "Assistant"}
    return "\n\n".join(f"### {names.get(m['role'], m['role'])}:\n{m['text']}" for m in messages)


class OASST2Judge(PairwiseJudge):
    name = "oasst2_judge"
    lang = "en"
    split = "train"

    def configure(self, task_config, split: str) -> None:
        super().configure(task_config, split)
        self.lang, self.split = task_config.lang, split

    def load(self, path: str) -> list:
        rows = read_jsonl(path, FIELDS)
        by_id = {r["message_id"]: r for r in rows}
        replies: dict[str, list[dict]] = {}
        for r in rows:
            if r["role"] == "assistant" and r.get("rank") is not None and r["parent_id"] in by_id:
                replies.setdefault(r["parent_id"], []).append(r)
        out = []
        for parent_id, siblings in replies.items():
            parent = by_id[parent_id]
            if parent["role"] != "prompter" or len(siblings) < 2:
                continue
            if self.lang and parent.get("lang", self.lang) != self.lang:
                continue
            history = conversation(by_id, parent_id)
            tree = parent.get("message_tree_id") or history[0]["message_id"]
            if self.split and split_of(tree) != self.split:
                continue
            best, second = sorted(siblings, key=lambda r: r["rank"])[:2]
            if best["rank"] == second["rank"]:
                continue
            # the better reply goes first or second by a hash of the prompt: labels are balanced, and stable
            first_is_best = zlib.crc32(parent_id.encode()) % 2 == 0
            a, b = (best, second) if first_is_best else (second, best)
            out.append(pair_example(f"oasst2:{parent_id}", render_turns(history), a["text"], b["text"],
                                    ("A" if first_is_best else "B",), prompts=self.prompts_path,
                                    lang=parent.get("lang", ""), turns=len(history), tree=tree))
        if not out:
            raise S2DError(f"{path}: no prompter message has two ranked assistant replies (language "
                           f"{self.lang or 'any'!r}, split {self.split!r})")
        return out
