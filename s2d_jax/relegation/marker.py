"""The self-routing System 1 (`route.method=self`, after Thinkless, arXiv 2505.13379): the distilled model learns to
answer with a short marker (`route.marker`, "<think>") instead of an answer where its System 2 would disagree with
it, and routing follows the marker at no extra cost: one greedy System 1 answer, as `logprob` asks.

Its targets come from the round's pool without labels, as the probe's do: the model is distilled on the examples
outside the held-out share (`probe.held_out`), answers the held-out ones greedily, and then trains on for
`route.self_steps` steps on every example, the held-out ones it answered unlike System 2 now with the marker as
their target (stage `train`, `self_targets`). A model answers its own training examples as taught, so only unseen
ones say where it is wrong.

The confidence (for thresholds and the sweep): 0 for a marked answer; else 0.75 + 0.25 x the answer's per-token
probability. So any threshold up to 0.75 (`route.threshold`'s default included) follows the marker alone, and
higher ones also escalate the unmarked answers that are unsure, as `logprob` would: one curve from the marker to
System 2 on every input."""

from __future__ import annotations

from s2d_jax.relegation.routing import agrees, token_probability

DIR = "self"  # WORKDIR/self/: the second phase's targets, checkpoints and metrics
FOLLOW = 0.75  # up to this threshold, marked answers escalate and nothing else


def wanted(config) -> bool:
    """Whether the model learns the marker: `route.method=self`."""
    return config.route.method == "self"


def marked(text: str, marker: str) -> bool:
    """Whether System 1 asked for System 2: its answer starts with the marker."""
    return text.lstrip().startswith(marker)


def confidence(text: str, logprobs, marker: str | None) -> float:
    """The self-routing confidence of a greedy answer; `marker` None: a model never taught it (the base model,
    before any round distilled it), whose every input escalates, as the probe router's base model's does."""
    if marker is None or marked(text, marker):
        return 0.0
    return FOLLOW + (1 - FOLLOW) * token_probability(logprobs)


def self_targets(rows: list[dict], answers: list[str], parse, marker: str) -> list[dict]:
    """The held-out examples' second-phase targets: the marker where the model's greedy answer (`answers`, its
    texts) does not parse to System 2's self-consistent answer (`target`), else the answer; each row keeps what
    the model said (`system1`) and whether it is `marked`."""
    out = []
    for row, text in zip(rows, answers):
        wrong = not agrees(parse, text, row["target"])
        out.append({**row, "target": marker if wrong else row["target"], "marked": wrong, "system1": text})
    return out
