"""Pairwise LLM-as-a-judge tasks (the BSM task): which of two responses to a question is better, A, B or tie.

System 1's prompt is MT-bench's own judge prompt (FastChat's `judge_prompts.jsonl`, read at run time: `pair-v2`,
its multi-turn form, and the math variants with a reference answer), its system prompt written before the filled
template in the one user message. An example's `meta` holds `question`, `response_a` and `response_b` (BSM's
template fields), the judge prompt's name and fields (so `swap` can rebuild it with the responses exchanged), and
its label the human verdict(s). `metrics` reports agreement with the human votes as the MT-bench paper computes it
(FastChat's compute_agreement.py): each verdict against each expert vote on the same (question, turn, model pair);
"with ties" counts every vote (a tie verdict agrees with a tie vote), "without ties" leaves out pairs where either
side is a tie; and position inconsistency when both orders were judged."""

from __future__ import annotations

import collections
import functools
import os
import re

from s2d_jax import datasets
from s2d_jax.artifacts import read_jsonl
from s2d_jax.errors import S2DError
from s2d_jax.system2.filters import MIRROR
from s2d_jax.system2.tasks.base import Example, Task

SWAP_SUFFIX = ":swap"
DEFAULT_PROMPTS = "data:mt_bench/judge_prompts.jsonl"  # a registry name (s2d_jax.datasets), or a path
_SWAPPED = {"answer_a": "answer_b", "answer_b": "answer_a", "answer_a_1": "answer_b_1", "answer_b_1": "answer_a_1",
            "answer_a_2": "answer_b_2", "answer_b_2": "answer_a_2"}


@functools.cache
def judge_prompts(path: str) -> dict[str, dict]:
    """FastChat's judge prompts by name (`pair-v2`, ...), from `judge_prompts.jsonl` (a path or a data name)."""
    local = datasets.resolve(path)
    if not os.path.exists(local):
        raise S2DError(f"{path}: no such file (MT-bench's judge_prompts.jsonl; config key 'task.judge_prompts')")
    rows = read_jsonl(local, ("name", "system_prompt", "prompt_template"))
    return {r["name"]: r for r in rows}


def render(prompts_path: str, name: str, fields: dict) -> str:
    """A judge prompt as one user message: the system prompt, a blank line, the filled template."""
    spec = judge_prompts(prompts_path).get(name)
    if spec is None:
        raise S2DError(f"{prompts_path}: no judge prompt named {name!r}")
    return spec["system_prompt"] + "\n\n" + spec["prompt_template"].format(**fields)


def pair_example(id: str, question: str, response_a: str, response_b: str, votes: tuple[str, ...], *,
                 prompts: str, judge: str = "pair-v2", fields: dict | None = None, **meta) -> Example:
    """A judging example. `fields` fills the judge prompt `judge` (default: pair-v2's question and answers)."""
    fields = fields or {"question": question, "answer_a": response_a, "answer_b": response_b}
    return Example(id, render(prompts, judge, fields), tuple(votes),
                   {"question": question, "response_a": response_a, "response_b": response_b, "judge": judge,
                    "judge_fields": fields, "prompts": prompts, **meta})


def majority(votes) -> str | None:
    ranked = collections.Counter(votes).most_common()
    if not ranked:
        return None
    return "tie" if len(ranked) > 1 and ranked[0][1] == ranked[1][1] else ranked[0][0]


class PairwiseJudge(Task):
    """Shared by the judging tasks; subclasses only load their data."""

    answer_tokens = 16
    prompts_path = DEFAULT_PROMPTS

    def configure(self, task_config, split: str) -> None:
        self.prompts_path = task_config.judge_prompts or DEFAULT_PROMPTS

    def system1_prompt(self, example: Example, instruction: str = "") -> str:
        return example.input  # the judge prompt asks for its own verdict format

    def parse(self, text: str) -> str | None:
        """'[[A]]' / '[[B]]' / '[[C]]' (the last one), else 'Assistant A is better', 'tie'."""
        found = re.findall(r"\[\[\s*([ABC])\s*\]\]", text)
        if found:
            return {"A": "A", "B": "B", "C": "tie"}[found[-1]]
        found = re.findall(r"\b(?:assistant|response)\s+([AB])\b[^.\n]*?\bbetter\b", text, re.IGNORECASE)
        if found:
            return found[-1].upper()
        if re.search(r"\b(tie|equally good|both (?:responses|assistants) are equal)\b", text, re.IGNORECASE):
            return "tie"
        return None

    def target(self, answer, instruction: str = "") -> str:
        return "[[C]]" if answer == "tie" else f"[[{answer}]]"

    def score(self, answer, example: Example) -> bool:
        """Agreement with the majority of the human votes (a split vote counts as tie)."""
        return answer is not None and answer == majority(example.label)

    def swap(self, example: Example) -> Example:
        m = example.meta
        votes = tuple(MIRROR[v] for v in example.label)
        fields = {_SWAPPED.get(k, k): v for k, v in m["judge_fields"].items()}
        rest = {k: v for k, v in m.items() if k not in ("question", "response_a", "response_b", "judge",
                                                         "judge_fields", "prompts")}
        return pair_example(example.id + SWAP_SUFFIX, m["question"], m["response_b"], m["response_a"], votes,
                            prompts=m["prompts"], judge=m["judge"], fields=fields, **rest)

    def metrics(self, examples, answers) -> dict:
        return agreement(examples, answers)


def _human_votes(example: Example) -> list[str]:
    """The votes that count as human: MT-bench's experts (FastChat leaves the authors' votes out); every vote
    where the data names no judges (OASST2)."""
    judges = example.meta.get("judges")
    if not judges:
        return list(example.label)
    return [v for v, j in zip(example.label, judges) if j.startswith("expert")]


def agreement(examples, answers) -> dict:
    """Agreement with human votes (with and without ties, overall and per turn where turns exist) and position
    inconsistency. Where both orders were judged, the verdict is the first order's when the swapped order mirrors
    it and a tie otherwise, as MT-bench counts GPT-4's pairwise verdicts ("tie (inconsistent)")."""
    by_id = {e.id: a for e, a in zip(examples, answers)}
    verdicts, both = {}, []
    for e, a in zip(examples, answers):
        if e.id.endswith(SWAP_SUFFIX):
            continue
        twin = e.id + SWAP_SUFFIX
        if twin in by_id:
            b = by_id[twin]
            both.append(a is None or b is None or MIRROR[b] != a)
            verdicts[e.id] = a if not both[-1] else "tie"
        else:
            verdicts[e.id] = a
    out = {}
    firsts = [e for e in examples if not e.id.endswith(SWAP_SUFFIX)]
    turns = sorted({e.meta.get("turn") for e in firsts if e.meta.get("turn")})
    for suffix, keep in [("", lambda e: True)] + [(f"_turn{t}", lambda e, t=t: e.meta.get("turn") == t)
                                                  for t in turns]:
        pairs = [(verdicts[e.id], v) for e in firsts if keep(e) for v in _human_votes(e)]
        without = [(a, v) for a, v in pairs if a != "tie" and v != "tie"]
        out[f"agreement_with_ties{suffix}"] = sum(a == v for a, v in pairs) / max(len(pairs), 1)
        out[f"agreement_without_ties{suffix}"] = sum(a == v for a, v in without) / max(len(without), 1)
    if both:
        out["position_inconsistency"] = sum(both) / len(both)
    return out
