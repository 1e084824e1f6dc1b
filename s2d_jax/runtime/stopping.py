"""Stopping on SIGTERM (a preempted VM, a scheduler) or SIGINT (Ctrl-C) at a point every host agrees on.

Inside `on_signals()` either signal only sets a flag; the long loops (the rollout engine between decode chunks,
rollout chunks, train steps, the stages of `s2d run`) call `check()` at their boundaries, which agrees the flag
over all hosts (so every host stops at the same point and no collective is left waiting) and raises `Stopped`.
A second signal of either kind ends the process at once, as without us. The CLI prints the one line and exits
128 + the signal's number (143, 130).
"""

from __future__ import annotations

import contextlib
import signal
import threading

from s2d_jax.errors import S2DError

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []
_installed = False  # whether our handlers are in place (nested blocks leave them)


class Stopped(S2DError):
    """A stop was asked for by a signal; what was complete is kept. `where` says where the work stopped ("after 40
    of 400 inputs"; None: the caller says); `code` is the process's exit status."""

    def __init__(self, signum: int, where: str | None = None):
        self.signum, self.where, self.code = signum, where, 128 + signum
        super().__init__(f"stopped by {name(signum)}" + (f" {where}" if where else ""))


def name(signum: int) -> str:
    return signal.Signals(signum).name


@contextlib.contextmanager
def on_signals():
    """SIGTERM and SIGINT request a stop while the block runs (main thread only; nested blocks share one)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _request) for s in SIGNALS}
    _installed = True
    _received.clear()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _installed = False


def _request(signum, frame) -> None:
    import logging

    _received.append(signum)
    for s in SIGNALS:  # the next one is not asked twice
        signal.signal(s, signal.SIG_DFL if s == signal.SIGTERM else signal.default_int_handler)
    logging.getLogger("s2d").warning("%s: stopping at the next safe point (again to stop at once)", name(signum))


def received() -> int | None:
    """The signal this host received, if any (not agreed with the other hosts)."""
    return _received[0] if _received else None


def requested() -> int | None:
    """The signal any host received (agreed over hosts: call it at the same point on every host)."""
    from s2d_jax.runtime import distributed

    flags = distributed.agree([received() == s for s in SIGNALS])
    return next((s for s, f in zip(SIGNALS, flags) if f), None)


def check(where: str | None = None) -> None:
    """Raise `Stopped` when a stop was requested on any host."""
    signum = requested()
    if signum is not None:
        raise Stopped(signum, where)
