"""Deterministic fault points, so that every kill-and-resume test kills where it means to.

`S2D_FAULT=POINT:N[:SIGNAL]` sends this process SIGNAL (default SIGKILL) the N-th time it passes POINT:
`rollout-chunk` (a chunk of rollouts is on disk), `train-step` (an optimizer step is done and, when due, logged
and checkpointed), `decode-chunk` (the rollout engine is about to decode its next chunk of steps), `filter` (the
filter has decided, before it writes), `tracker-log` (the trackers got a row of metrics). SIGNAL may instead be
`child=NAME`: SIGKILL this process's child processes whose name contains NAME (a tracker's service dying mid-run:
`child=wandb-core`). Unset, a point costs one dictionary lookup.
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
    if _passed[name] != int(parts[1]):
        return
    if len(parts) > 2 and parts[2].startswith("child="):
        for pid in _children(parts[2][len("child="):]):
            os.kill(pid, signal.SIGKILL)
        return
    os.kill(os.getpid(), getattr(signal, parts[2]) if len(parts) > 2 else signal.SIGKILL)


def _children(name: str) -> list[int]:
    """This process's children whose command name contains `name` (from /proc: Linux)."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except (OSError, ValueError):
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[1]) == os.getpid() and name in comm:
            out.append(int(entry))
    return out
