"""Vote-aware sampling: an input's samples are drawn in sample-index order, a few at a time, and its sampling stops
once more samples are not worth drawing. Pure host code over the answers drawn so far (in sample order), so a
stopping decision depends on nothing but that input's own answers: the same config and seed stop at the same
sample in any batch, chunk or host layout.

Rules (`generate.adaptive`):
- `decided`: stop once the majority vote over all N samples (`filters.vote` with `filter.min_share`) can no longer
  change: the leader cannot be caught or tied by the samples left and already has the share, or no answer can
  reach the share any more. The kept answer is exactly the full-N vote's, by construction.
- `beta`: Adaptive-Consistency's Beta stopping criterion (Aggarwal et al. 2023): stop once the probability that the
  leading answer is the majority of the answer distribution, under a Beta(c1 + 1, c2 + 1) posterior over the
  counts of the two leading answers, is at least `generate.adaptive_confidence` (0.95 in the paper). It can stop
  before the full-N majority is certain: the kept answer may differ from it (measured by `benchmarks/`).
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Sequence

RULES = ("off", "decided", "beta")


def _top_two(answers: Sequence[Hashable | None]) -> tuple[int, int]:
    ranked = collections.Counter(a for a in answers if a is not None).most_common(2)
    return (ranked[0][1] if ranked else 0), (ranked[1][1] if len(ranked) > 1 else 0)


def should_stop(answers: Sequence[Hashable | None], n: int, rule: str, min_share: float = 0.0,
                confidence: float = 0.95) -> bool:
    """True when an input with these answers (its first samples, in order) needs no more of its `n` samples."""
    left = n - len(answers)
    if left <= 0 or rule == "off":
        return left <= 0
    c1, c2 = _top_two(answers)
    if rule == "decided":
        keep_certain = c1 > c2 + left and c1 / n >= min_share
        drop_certain = (c1 + left) / n < min_share
        return keep_certain or drop_certain
    if rule == "beta":
        from scipy.special import betainc

        if c1 == 0:
            return False
        return float(1.0 - betainc(c1 + 1, c2 + 1, 0.5)) >= confidence
    raise ValueError(f"unknown adaptive rule {rule!r}")


def samples_needed(answers: Sequence[Hashable | None], n: int, wave: int, rule: str, min_share: float = 0.0,
                   confidence: float = 0.95) -> int | None:
    """How many samples the rule draws for an input whose first samples gave `answers`, drawing `wave` at a time
    and checking after each wave; None when these answers do not settle it yet."""
    for k in range(wave, n, wave):
        if k > len(answers):
            return None
        if should_stop(answers[:k], n, rule, min_share, confidence):
            return k
    return n if len(answers) >= n else None
