"""Deterministic fault points, so that every kill-and-resume test kills where it means to.

`S2D_FAULT=POINT:N[:SIGNAL]` sends this process SIGNAL (default SIGKILL) the N-th time it passes POINT:
`rollout-chunk` (a chunk of rollouts is on disk), `train-step` (an optimizer step is done and, when due, logged
and checkpointed), `decode-chunk` (the rollout engine is about to decode its next chunk of steps), `filter` (the
filter has decided, before it writes). Unset, a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_passed: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("S2D_FAULT")
    if not spec or spec.split(":")[0] != name:
        return
    parts = spec.split(":")
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] == int(parts[1]):
        os.kill(os.getpid(), getattr(signal, parts[2]) if len(parts) > 2 else signal.SIGKILL)
