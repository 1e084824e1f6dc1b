"""Out of memory as one line: which program ran out (train step, prefill, decode) or which host buffer, at what
shapes, what `s2d plan` computes for the config and what it advises; and, before any work, a refusal where the
plan already shows that the config cannot fit the devices at hand."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

from ml_collections import ConfigDict

from s2d_jax import mesh as mesh_lib
from s2d_jax.distributed import device_bytes
from s2d_jax.errors import REMEDIES, S2DError

log = logging.getLogger("s2d")
GB = 1 << 30
CERTAIN = 1.5  # the plan's figure over what the devices hold by this factor: refused before any work (else warned)


class OutOfMemory(S2DError):
    """A program or host buffer did not fit; `explain` adds the plan's figures and advice for the config."""

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


def explain(config: ConfigDict, e: OutOfMemory) -> str:
    """The one line: what ran out, then the plan's figures for this config on the devices at hand, and its advice."""
    try:
        p = _plan(config)
    except S2DError:
        return f"{e}; see `s2d plan` for this config"
    kind = "train" if "train" in e.program else "generate"
    return (f"{e}; `s2d plan` for this config on {p['devices']} devices: {kind} needs "
            f"{p[kind + '_total'] / GB:.2f} GB per device; {REMEDIES[kind]}")


def check_fits(config: ConfigDict, stage: str) -> None:
    """Before any work: refuse a stage whose plan is far over the memory of the devices at hand; warn when near."""
    kinds = {"train": ("train",), "generate": ("generate",), "eval": ("generate",), "filter": (),
             "run": ("generate", "train")}.get(stage, ())
    if not kinds or not (config.model.path or config.model.preset):
        return
    p, limit = _plan(config), device_bytes()
    for kind in kinds:
        need = p[kind + "_total"]
        if need > CERTAIN * limit:
            raise S2DError(f"{kind} needs {need / GB:.2f} GB per device by `s2d plan`, and the {p['devices']} "
                           f"device(s) here hold {limit / GB:.2f} GB each; {REMEDIES[kind]}")
        if need > limit:
            log.warning("%s needs %.2f GB per device by `s2d plan`, over the %.2f GB each device here holds: it may "
                        "run out of memory (%s)", kind, need / GB, limit / GB, REMEDIES[kind])


def _plan(config: ConfigDict) -> dict:
    from s2d_jax import plan as plan_lib
    import jax

    devices = len(mesh_lib.mesh_devices(config))
    gen = plan_lib.generation_shape(config, len(mesh_lib.generation_devices(config)), jax.local_device_count(),
                                    jax.default_backend(), device_bytes())
    return plan_lib.plan(config, plan_lib.mesh_shape(config.mesh, devices), gen)
