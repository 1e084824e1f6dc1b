"""Stage `plan`: per-device memory of the configured run, from shapes alone (see `s2d_jax.plan`)."""

from __future__ import annotations

import json
import os

from ml_collections import ConfigDict

from s2d_jax.artifacts import write_atomic
from s2d_jax.build import mesh_devices
from s2d_jax.errors import S2DError


def plan_stage(config: ConfigDict, workdir: str) -> str:
    """Stage `plan`: per-device bytes of parameters, optimizer state, activations (estimated) and KV cache for the
    configured mesh, written to `plan.json`; an error with advice when they do not fit `plan.device_gb`."""
    from s2d_jax import plan as plan_lib

    p = plan_lib.plan(config, plan_lib.mesh_shape(config.mesh, config.plan.devices or len(mesh_devices(config))))
    out = os.path.join(workdir, "plan.json")
    write_atomic(out, json.dumps(p, indent=2) + "\n")
    print(plan_lib.report(p))
    problems = plan_lib.advice(p, config)
    if problems:
        raise S2DError("; ".join(problems))
    return out
