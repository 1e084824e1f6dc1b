"""Where a sampler call's seconds go: each device phase timed to completion, compiles apart, the rest host time.

JAX reports every trace, lowering and XLA compile through `jax.monitoring`; one listener (registered once per
process) adds them up, so a phase's seconds are net of the compiles that happened inside it. `compiles` counts XLA
compiles (a persistent-cache hit is not one); `cache_hits` counts executables loaded from the persistent cache.
"""

from __future__ import annotations

import contextlib
import time

import jax

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_TOTALS = {"compile_s": 0.0, "backend": 0, "cache_hits": 0}
PHASES = ("prefill", "insert", "decode", "resize", "compile", "host")


def _on_duration(event: str, seconds: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _TOTALS["compile_s"] += seconds
        _TOTALS["backend"] += event == _COMPILE_EVENTS[-1]  # an XLA compile or a persistent-cache load


def _on_event(event: str, **_) -> None:
    _TOTALS["cache_hits"] += event == "/jax/compilation_cache/cache_hits"


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


def totals() -> dict:
    """Process-wide compile seconds, XLA compiles and persistent-cache hits so far."""
    return {"compile_s": _TOTALS["compile_s"], "compiles": _TOTALS["backend"] - _TOTALS["cache_hits"],
            "cache_hits": _TOTALS["cache_hits"]}


class Clock:
    """Seconds per phase of one call (`PHASES`); `host` is the wall time no phase covers."""

    def __init__(self):
        self.start, self.seconds = time.perf_counter(), dict.fromkeys(PHASES, 0.0)
        self.first = totals()

    @contextlib.contextmanager
    def __call__(self, phase: str):
        """`with clock(phase) as out: out.append(result)`: the phase lasts until `out`'s arrays are ready."""
        compile_s, t = _TOTALS["compile_s"], time.perf_counter()
        out: list = []
        yield out
        jax.block_until_ready(out)  # the phase ends when its device work does
        spent = _TOTALS["compile_s"] - compile_s
        self.seconds[phase] += time.perf_counter() - t - spent
        self.seconds["compile"] += spent

    def report(self) -> dict:
        """`{"seconds": {phase: s}, "wall_s", "compiles", "cache_hits"}` for the call so far."""
        wall = time.perf_counter() - self.start
        seconds = dict(self.seconds)
        seconds["host"] = max(0.0, wall - sum(v for k, v in seconds.items() if k != "host"))
        now = totals()
        return {"seconds": seconds, "wall_s": wall, "compiles": now["compiles"] - self.first["compiles"],
                "cache_hits": now["cache_hits"] - self.first["cache_hits"]}
