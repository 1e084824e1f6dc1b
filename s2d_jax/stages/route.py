"""Stage `route`: the router over the unlabelled pool. System 1 (the base model, or in round R > 1 round R-1's
distilled one) answers every input; the inputs it is not confident on (`route.*`) are escalated, and only they go
on to `generate` (System 2), `filter` and `train`: what System 1 already does is not distilled again."""

from __future__ import annotations

import json
import logging
import os

from ml_collections import ConfigDict

from s2d_jax import trackers
from s2d_jax.runtime import distributed
from s2d_jax.relegation import rounds
from s2d_jax.artifacts import write_atomic
from s2d_jax.build import build_generation_mesh, build_system1
from s2d_jax.relegation.routing import escalated, total
from s2d_jax.stages.inputs import ROUTED, load_inputs, system1_prompt
from s2d_jax.system2.tasks.judge import SWAP_SUFFIX

log = logging.getLogger("s2d")
REPORT = "route_report.json"


def route(config: ConfigDict, workdir: str) -> str | None:
    """Stage `route`: `route.jsonl` (per input: System 1's answer, its confidence, whether it is escalated, what
    asking cost) and `route_report.json` (how many were escalated and skipped, the router's cost). Without a router
    (`route.method=none`) every input goes to System 2 and nothing is written."""
    from s2d_jax import evaluate

    r = config.route
    if r.method == "none":
        return None
    out = os.path.join(workdir, ROUTED)
    if os.path.exists(out):
        log.info("%s is complete; skipping route", out)
        return out
    task, examples = load_inputs(config)
    examples = [e for e in examples if not e.id.endswith(SWAP_SUFFIX)]  # a swapped twin follows its input
    mesh = build_generation_mesh(config)
    model, tok = build_system1(config, mesh, workdir)
    log.info("route: System 1 (%s) on %d unlabelled inputs, %s >= %g stays with System 1", model_name(workdir),
             len(examples), r.method, r.threshold)
    rows, seconds = evaluate.router(model, tok, task, examples, **router_args(config, task, mesh),
                                    **router_state(config, rounds.system1_path(workdir), model_name(workdir), model))
    for row in rows:
        row["escalated"] = escalated(row["confidence"], r.threshold)
    up = sum(row["escalated"] for row in rows)
    report = {"method": r.method, "threshold": r.threshold, "system1": model_name(workdir), "inputs": len(rows),
              "escalated": up, "skipped": len(rows) - up, "escalated_share": up / max(len(rows), 1),
              "router": total(rows), "router_seconds": seconds}
    if distributed.primary():  # every host computed every row (one global mesh); one writes
        write_atomic(os.path.join(workdir, REPORT), json.dumps(report, indent=2) + "\n")
        write_atomic(out, "".join(json.dumps(row, default=str) + "\n" for row in rows))
    trackers.log(workdir, "route", report)
    distributed.barrier(f"route {workdir}")  # generate, on every host, reads the decisions
    log.info("route: %d of %d inputs escalated to System 2 (%.0f%%); %d answered by System 1", up, len(rows),
             100 * report["escalated_share"], len(rows) - up)
    return out


def router_args(config: ConfigDict, task, mesh) -> dict:
    """`evaluate.router`'s keywords from the config (the pool's router and eval's routed system ask alike)."""
    r, g = config.route, config.generate
    return dict(method=r.method, samples=r.samples, temperature=r.temperature, seed=config.seed,
                prompt=lambda x: system1_prompt(config, task, x), chat=config.program.chat,
                max_new_tokens=config.eval.max_new_tokens or task.answer_tokens, mesh=mesh, max_batch=g.max_batch,
                cache_dtype=g.cache_dtype or None)


def router_state(config: ConfigDict, system1: str | None, name: str, model, method: str = "") -> dict:
    """What the router (`route.method`, or `method`) reads besides System 1's answers: the probe trained for System 1
    (saved beside the distilled model `system1`, in its round's `router/`), and whether System 1 was taught the
    marker (`self`). The base model (`system1` None) has neither, so every input escalates, and System 2's answers
    train them; a probe not trained yet is None too."""
    from s2d_jax.relegation import probe

    method = method or config.route.method
    found = probe.load(os.path.dirname(system1), name, model.cfg.num_layers) if method == "probe" and system1 else None
    return {"probe": found, "marker": config.route.marker if method == "self" and system1 else None}


def model_name(workdir: str) -> str:
    """This round's System 1 as the reports name it: "base", or its path in the workdir."""
    path = rounds.system1_path(workdir)
    return os.path.relpath(path, rounds.root(workdir)) if path else "base"
