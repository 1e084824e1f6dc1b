"""Out of memory as one line: which program ran out (train step, prefill, decode) or which host buffer, at what
shapes. What `s2d plan` computes and advises for the config is added by `plan.explain`; the refusal before any
work, where the plan shows that the config cannot fit the devices at hand, is `plan.check_fits`. (No planning
here: the sampler and the trainer import this module, and the plan reads the programs that import the sampler.)"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from s2d_jax.errors import S2DError


class OutOfMemory(S2DError):
    """A program or host buffer did not fit; `plan.explain` adds the plan's figures and advice for the config."""

    def __init__(self, program: str, shapes: str, detail: str, host: bool):
        self.program, self.shapes, self.detail, self.host = program, shapes, detail, host
        super().__init__(f"out of {'host' if host else 'device'} memory in the {program} ({shapes}): {detail}")


def exhausted(e: BaseException) -> bool:
    """Whether `e` is a memory exhaustion: the host's (MemoryError) or XLA's (RESOURCE_EXHAUSTED)."""
    return isinstance(e, MemoryError) or ("RESOURCE_EXHAUSTED" in str(e) and type(e).__name__.endswith("Error"))


@contextlib.contextmanager
def program(name: str, shapes: Callable[[], str]):
    """Name the program that runs inside the block, should it run out of memory (`shapes` is called only then)."""
    try:
        yield
    except OutOfMemory:
        raise
    except Exception as e:
        if not exhausted(e):
            raise
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise OutOfMemory(name, shapes(), detail, isinstance(e, MemoryError)) from None
