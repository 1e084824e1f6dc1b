"""Relegation's router: System 1's confidence in an answer, the decision to escalate an input to System 2, and the
routed system's scores at any threshold from one set of per-input rows (pure host code: the samples come from
`evaluate`, which runs the models).

An input is escalated when System 1's confidence is below `route.threshold`; the routed answer is then System 2's,
else System 1's. Its cost per input counts every System 1 sample of every input and every System 2 call of the
escalated inputs, nothing twice. Sweeping the threshold over the same rows gives the accuracy-against-cost curve:
exactly what one routed run per threshold would give, since each input's samples are keyed by the input alone.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Hashable, Sequence

from s2d_jax.system2.filters import majority, vote

COSTS = ("generated_tokens", "prompt_tokens", "flops")
# the default sweep: 0, 0.05, ..., 0.9, then finer towards 1, where a per-token probability's thresholds live
GRID = tuple(round(0.05 * i, 2) for i in range(19)) + (0.92, 0.94, 0.96, 0.98, 0.99, 0.995, 0.999, 1.0)


def total(rows) -> dict:
    """Each cost summed over per-input rows (or per-call costs)."""
    return {k: sum(r[k] for r in rows) for k in COSTS}


def input_key(input_id: str) -> int:
    """The sampling key of an input's System 1 samples: its id, not its place in a batch."""
    return zlib.crc32(f"route\x1f{input_id}".encode())


def agreement(answers: Sequence[Hashable | None]) -> tuple[Hashable | None, float]:
    """(majority answer, share of the samples that give it): unparsed samples count in the share, as the filter's
    vote counts them; a tie keeps the answer seen first."""
    return majority(answers), vote(answers).share


def token_probability(logprobs: Sequence[float] | None) -> float:
    """exp(mean token log-probability): the answer's per-token probability, in [0, 1] like agreement (an answer
    with no token: 0)."""
    return math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0


def agrees(parse, text: str, target: str) -> bool:
    """Whether System 1's answer `text` parses to System 2's self-consistent answer `target`: the label the learned
    routers (probe, marker) are trained on."""
    mine = parse(text)
    return mine is not None and mine == parse(target)


def escalated(confidence: float, threshold: float) -> bool:
    """System 2 takes the input when System 1 is less sure than `threshold` (threshold 0: never; above every
    confidence: always)."""
    return confidence < threshold


def thresholds(route) -> list[float]:
    """The sweep's thresholds (`route.thresholds`, or the 0.05 grid), with the operating `route.threshold`."""
    return sorted({float(t) for t in (route.thresholds or GRID)} | {float(route.threshold)})


def routed(system1: list[dict], system2: list[dict], threshold: float, seconds: tuple[float, float] = (0.0, 0.0)
           ) -> dict:
    """The routed system's scores from per-input rows of System 1 (with `confidence`) and System 2 (`correct` and
    cost each), in the same input order. `seconds`: each system's wall time over all inputs; System 2's is
    apportioned to the escalated inputs by their share of its FLOPs (a batch's seconds have no per-input split)."""
    if [r["id"] for r in system1] != [r["id"] for r in system2]:
        raise ValueError("routed: System 1 and System 2 rows are not for the same inputs in the same order")
    n = len(system1)
    up = [escalated(one["confidence"], threshold) for one in system1]
    correct = sum(two["correct"] if e else one["correct"] for one, two, e in zip(system1, system2, up))
    one, two = total(system1), total([r for r, e in zip(system2, up) if e])
    cost = {k: one[k] + two[k] for k in COSTS}
    flops2 = sum(r["flops"] for r in system2)
    share2 = sum(r["flops"] for r, e in zip(system2, up) if e) / flops2 if flops2 else sum(up) / max(n, 1)
    wall = seconds[0] + seconds[1] * share2
    return {"threshold": threshold, "accuracy": correct / n, "escalated": sum(up) / n, "escalated_n": sum(up),
            **{k: v / n for k, v in cost.items()}, "mean_tokens": cost["generated_tokens"] / n, "n": n,
            "seconds": wall / n, "seconds_total": wall}


def sweep(system1: list[dict], system2: list[dict], points: Sequence[float], seconds=(0.0, 0.0)) -> list[dict]:
    """`routed` at every threshold of `points`: the accuracy-against-cost curve."""
    return [routed(system1, system2, t, seconds) for t in points]


def calibration(rows: list[dict], bins: int = 10) -> dict:
    """How well a router's `confidence` predicts that System 1's answer is `correct` on labelled inputs: AUROC (the
    chance that a right answer is more confident than a wrong one, ties counting half; None when all are right or
    all wrong) and expected calibration error (the confidence read as a probability, `bins` equal-width bins,
    |accuracy - mean confidence| weighted by the bin's share)."""
    right = [r["confidence"] for r in rows if r["correct"]]
    wrong = [r["confidence"] for r in rows if not r["correct"]]
    auroc = None
    if right and wrong:
        wins = sum((a > b) + 0.5 * (a == b) for a in right for b in wrong)
        auroc = wins / (len(right) * len(wrong))
    ece = 0.0
    for k in range(bins):
        inside = [r for r in rows if min(int(r["confidence"] * bins), bins - 1) == k]
        if inside:
            accuracy = sum(bool(r["correct"]) for r in inside) / len(inside)
            confidence = sum(r["confidence"] for r in inside) / len(inside)
            ece += len(inside) / len(rows) * abs(accuracy - confidence)
    return {"auroc": auroc, "ece": ece, "n": len(rows), "right": len(right)}
