"""Stage `plan`: per-device memory of the configured run, from shapes alone (see `s2d_jax.plan.estimate`); with
`plan.topology`, every device program compiled for that accelerator type too (see `s2d_jax.plan.aot`)."""

from __future__ import annotations

import json
import os

from ml_collections import ConfigDict

from s2d_jax.artifacts import write_atomic
from s2d_jax.mesh import mesh_devices
from s2d_jax.errors import S2DError


def plan_stage(config: ConfigDict, workdir: str) -> str:
    """Stage `plan`: per-device bytes of parameters, optimizer state, activations (estimated) and KV cache for the
    configured mesh, and with `plan.topology` XLA's compiled figures for that target, written to `plan.json`; an
    error with advice when they do not fit."""
    from s2d_jax.plan import estimate as plan_lib

    target = None
    if config.plan.topology:
        from s2d_jax.plan import aot

        target = aot.target(config.plan.topology)
    if target:  # the generation mesh as the stages would choose it there
        p = aot.target_plan(config, target)
    else:
        devices = config.plan.devices or len(mesh_devices(config))
        if config.plan.devices:  # an accelerator host of that many devices, each of plan.device_gb
            gen = plan_lib.generation_shape(config, devices, devices, "accelerator",
                                            config.plan.device_gb * plan_lib.GB)
        else:
            import jax

            gen = plan_lib.generation_shape(config, devices, jax.local_device_count(), jax.default_backend(),
                                            config.plan.device_gb * plan_lib.GB)
        p = plan_lib.plan(config, plan_lib.mesh_shape(config.mesh, devices), gen)
    if target:
        from s2d_jax.train.trainer import check_rows

        check_rows(config.train, p["mesh"]["data"] * p["mesh"]["fsdp"])  # as the trainer would refuse it
        p.update(aot.plan_figures(config, target, p))
    out = os.path.join(workdir, "plan.json")
    write_atomic(out, json.dumps(p, indent=2) + "\n")
    print(plan_lib.report(p))
    problems = plan_lib.advice(p, config)
    if problems:
        raise S2DError("; ".join(problems))
    return out
