"""Self-consistency filters: pure host code over parsed answers, no model gradients.

Each filter decides per input: keep it with a target answer, or drop it with a reason. `FilterReport` sums the
decisions into what a user checks after `s2d filter`: kept fraction, vote-share histogram, drop reasons.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Hashable, Sequence

MIRROR = {"A": "B", "B": "A", "tie": "tie"}


@dataclasses.dataclass(frozen=True)
class Decision:
    answer: Hashable | None  # the target when kept, else None
    share: float  # votes of the top answer / number of samples (unparseable samples count)
    reason: str | None = None  # why dropped: all_invalid | tie | below_min_share | order_inconsistent | usc_*
    sample: int = 0  # the sample whose final response stands for the answer (the first with it; USC's choice)


def vote(answers: Sequence[Hashable | None], min_share: float = 0.0, total: int | None = None) -> Decision:
    """Majority vote. None (unparseable) samples count in the denominator; a tie for the top gives no answer;
    a share below `min_share` (inclusive bound: equal is kept) gives no answer. `total`: the number of samples the
    share is over when fewer were drawn (vote-aware sampling stopped once the vote could not change)."""
    valid = [a for a in answers if a is not None]
    if not valid:
        return Decision(None, 0.0, "all_invalid")
    ranked = collections.Counter(valid).most_common()
    share = ranked[0][1] / (total or len(answers))
    if len(ranked) > 1 and ranked[1][1] == ranked[0][1]:
        return Decision(None, share, "tie")
    if share < min_share:
        return Decision(None, share, "below_min_share")
    return Decision(ranked[0][0], share, sample=list(answers).index(ranked[0][0]))


def majority(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most frequent parsed answer (ties: the one seen first); None when nothing parsed. Unlike `vote`, never
    withholds an answer: what a system answers, not what it may be distilled on."""
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def first_sample(answers: Sequence[Hashable | None]) -> Decision:
    """No filter (the paper's ablation): the first sample's answer, whatever the others say; dropped only when it
    did not parse. The share is still reported."""
    if answers[0] is None:
        return Decision(None, 0.0, "unparsed")
    return Decision(answers[0], sum(a == answers[0] for a in answers) / len(answers))


def majority_vote(answers: Sequence[Hashable | None], min_share: float = 0.0) -> tuple[Hashable | None, float]:
    """`(answer or None, share)`: see `vote`."""
    d = vote(answers, min_share)
    return d.answer, d.share


def order_swap(verdicts_ab: Sequence[str | None], verdicts_ba: Sequence[str | None],
               min_share: float = 0.0) -> Decision:
    """Pairwise judging under input perturbation: the verdict on (B, A) must mirror the verdict on (A, B).

    Verdicts are "A", "B" or "tie" (None: unparseable). Each order is majority-voted; the input is kept only when
    the (B, A) majority, mirrored, equals the (A, B) majority. The share is the smaller of the two shares.
    """
    ab = vote(verdicts_ab, min_share)
    ba = vote([MIRROR.get(v) if v is not None else None for v in verdicts_ba], min_share)
    share = min(ab.share, ba.share)
    if ab.reason or ba.reason:
        return Decision(None, share, ab.reason or ba.reason)
    if ab.answer != ba.answer:
        return Decision(None, share, "order_inconsistent")
    return Decision(ab.answer, share, sample=ab.sample)


USC_TEMPLATE = ("I have generated the following responses to the question: {question}\n\n{responses}\n\n"
                "Evaluate these responses. Select the most consistent response based on majority consensus. Start "
                "your answer with \"The most consistent response is Response X\" (without quotes).")


def usc_prompt(question: str, responses: Sequence[str]) -> str:
    """Universal self-consistency (Chen et al. 2023): ask the model which of N free-form responses agrees most
    with the others, where exact-match voting cannot."""
    listed = "\n\n".join(f"Response {i}: {r.strip()}" for i, r in enumerate(responses))
    return USC_TEMPLATE.format(question=question, responses=listed)


USC_TOKENS = 32  # the selection call's budget: "The most consistent response is Response X"


def usc_select(sampler, groups: Sequence[Sequence[dict]], chat: bool, progress: bool = False):
    """One greedy call per input asking which of its samples' final responses is the most consistent: (the chosen
    index or None, the call's `Sample`) per input. `groups` are each input's rollout records in sample order."""
    prompts = [usc_prompt(rows[0]["input"], [r["stages"][-1]["output"] if r.get("stages") else str(r["answer"])
                                             for r in rows]) for rows in groups]
    outs = sampler.generate(prompts, max_new_tokens=USC_TOKENS, chat=chat, progress=progress)
    return [(parse_usc(s.text, len(rows)), s) for (s,), rows in zip(outs, groups)]


def parse_usc(text: str, count: int) -> int | None:
    """The response index the model chose ("The most consistent response is Response 2"), or None."""
    import re

    found = re.findall(r"response\s*#?\s*(\d+)", text, re.IGNORECASE)
    index = int(found[0]) if found else None
    return index if index is not None and 0 <= index < count else None


def usc(choice: int | None, answers: Sequence[Hashable | None]) -> Decision:
    """The chosen sample's answer; share = how many samples gave that same answer / N."""
    if choice is None:
        return Decision(None, 0.0, "usc_no_choice")
    answer = answers[choice]
    if answer is None:
        return Decision(None, 0.0, "all_invalid" if all(a is None for a in answers) else "usc_chose_invalid")
    return Decision(answer, sum(a == answer for a in answers) / len(answers), sample=choice)


@dataclasses.dataclass
class FilterReport:
    """What a filter did over a whole rollout set."""

    total: int = 0
    kept: int = 0
    drops: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    share_histogram: list[int] = dataclasses.field(default_factory=lambda: [0] * 10)  # shares in tenths

    def add(self, decision: Decision) -> None:
        self.total += 1
        self.share_histogram[min(int(decision.share * 10), 9)] += 1
        if decision.reason is None:
            self.kept += 1
        else:
            self.drops[decision.reason] += 1

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "kept_fraction": self.kept_fraction,
                "drops": dict(sorted(self.drops.items())),
                "share_histogram": {f"{i / 10:.1f}-{(i + 1) / 10:.1f}": n for i, n in enumerate(self.share_histogram)}}
