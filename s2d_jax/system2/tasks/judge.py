"""Pairwise LLM-as-a-judge tasks (the BSM task): which of two responses to a question is better, A, B or tie.

An example's `meta` holds `question`, `response_a` and `response_b` (BSM's template fields) and its label the
human verdict(s). `swap` exchanges the responses (the verdict must mirror: the order-swap filter), and `metrics`
reports agreement with the human votes with and without ties, and position inconsistency when both orders were
judged."""

from __future__ import annotations

import collections
import re

from s2d_jax.system2.filters import MIRROR
from s2d_jax.system2.tasks.base import Example, Task

SWAP_SUFFIX = ":swap"

# MT-bench's "pair-v2" judge prompt (FastChat, Apache-2.0), as the System 1 prompt: the verdict directly.
JUDGE_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Do not allow the length of the responses or their order to influence "
    "your decision. Output your final verdict by strictly following this format: \"[[A]]\" if assistant A is "
    "better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.\n\n"
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{response_a}\n"
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{response_b}\n"
    "[The End of Assistant B's Answer]")


def pair_example(id: str, question: str, response_a: str, response_b: str, votes: tuple[str, ...],
                 **meta) -> Example:
    fields = {"question": question, "response_a": response_a, "response_b": response_b}
    return Example(id, JUDGE_PROMPT.format(**fields), tuple(votes), {**fields, **meta})


def majority(votes) -> str | None:
    ranked = collections.Counter(votes).most_common()
    if not ranked:
        return None
    return "tie" if len(ranked) > 1 and ranked[0][1] == ranked[1][1] else ranked[0][0]


class PairwiseJudge(Task):
    """Shared by the judging tasks; subclasses only load their data."""

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

    def target(self, answer) -> str:
        return "[[C]]" if answer == "tie" else f"[[{answer}]]"

    def score(self, answer, example: Example) -> bool:
        """Agreement with the majority of the human votes (a split vote counts as tie)."""
        return answer is not None and answer == majority(example.label)

    def swap(self, example: Example) -> Example:
        m = example.meta
        votes = tuple(MIRROR[v] for v in example.label)
        return pair_example(example.id + SWAP_SUFFIX, m["question"], m["response_b"], m["response_a"], votes,
                            **{k: v for k, v in m.items() if k not in ("question", "response_a", "response_b")})

    def metrics(self, examples, answers) -> dict:
        """Agreement over individual human votes, with ties (a tie verdict counts) and without (votes and verdicts
        that are ties left out), and position inconsistency over inputs judged in both orders."""
        with_ties = [a == v for e, a in zip(examples, answers) for v in e.label]
        without = [a == v for e, a in zip(examples, answers) if a not in (None, "tie") for v in e.label
                   if v != "tie"]
        out = {"agreement_with_ties": sum(with_ties) / max(len(with_ties), 1),
               "agreement_without_ties": sum(without) / max(len(without), 1)}
        by_id = {e.id: a for e, a in zip(examples, answers)}
        pairs = [(a, by_id[e.id + SWAP_SUFFIX]) for e, a in zip(examples, answers) if e.id + SWAP_SUFFIX in by_id]
        if pairs:
            out["position_inconsistency"] = sum(
                a is None or b is None or MIRROR[b] != a for a, b in pairs) / len(pairs)
        return out
