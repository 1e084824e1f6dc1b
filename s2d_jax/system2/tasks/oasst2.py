"""OASST2 pairwise judging: two ranked sibling assistant replies to the same prompter message, the better-ranked
one preferred. Reads the public flat message format (`2023-11-05_oasst2_ready.messages.jsonl[.gz]`: `message_id`,
`parent_id`, `role`, `text`, `rank`, ...) by path; no copy ships with the project."""

from __future__ import annotations

import zlib

from s2d_jax.artifacts import read_jsonl
from s2d_jax.errors import S2DError
from s2d_jax.system2.tasks.judge import PairwiseJudge, pair_example

FIELDS = ("message_id", "parent_id", "role", "text")


class OASST2Judge(PairwiseJudge):
    name = "oasst2_judge"

    def load(self, path: str) -> list:
        rows = read_jsonl(path, FIELDS)
        by_id = {r["message_id"]: r for r in rows}
        replies: dict[str, list[dict]] = {}
        for r in rows:
            if r["role"] == "assistant" and r.get("rank") is not None and r["parent_id"] in by_id:
                replies.setdefault(r["parent_id"], []).append(r)
        out = []
        for parent_id, siblings in replies.items():
            if by_id[parent_id]["role"] != "prompter" or len(siblings) < 2:
                continue
            best, second = sorted(siblings, key=lambda r: r["rank"])[:2]
            if best["rank"] == second["rank"]:
                continue
            # the better reply goes first or second by a hash of the prompt: labels are balanced, and stable
            first_is_best = zlib.crc32(parent_id.encode()) % 2 == 0
            a, b = (best, second) if first_is_best else (second, best)
            out.append(pair_example(f"oasst2:{parent_id}", by_id[parent_id]["text"], a["text"], b["text"],
                                    ("A" if first_is_best else "B",), lang=by_id[parent_id].get("lang", "")))
        if not out:
            raise S2DError(f"{path}: no prompter message has two ranked assistant replies")
        return out
