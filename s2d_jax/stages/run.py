"""Stage `run`: every stage in order, each skipped when its artifact is complete; the workdir keeps its config."""

from __future__ import annotations

import json
import logging
import os

from ml_collections import ConfigDict

from s2d_jax.artifacts import write_atomic
from s2d_jax.build import toy_base
from s2d_jax.errors import S2DError
from s2d_jax.stages.eval import evaluate_stage, nothing_kept
from s2d_jax.stages.filter import filter
from s2d_jax.stages.generate import generate
from s2d_jax.stages.pretrain import pretrain
from s2d_jax.stages.train import train

log = logging.getLogger("s2d")


# How a run is laid out on devices, not what it computes: a run may resume on another mesh or host count.
LAYOUT = ("mesh", "plan")


def keep_config(config: ConfigDict, workdir: str) -> None:
    """The workdir keeps the resolved config it was made with; a rerun with a different one is an error (its
    artifacts would silently mix two experiments). The device layout (`mesh`, `plan`) may change."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(json.dumps(config.to_dict()))
    if os.path.exists(path):
        with open(path) as f:
            kept = json.load(f)
        kept.update({k: current[k] for k in LAYOUT if k in current})
        if kept != current:
            key = _first_difference(kept, current)
            raise S2DError(f"{path}: this workdir was made with a different config (key {key!r}: "
                           f"{_get(kept, key)!r} there, {_get(current, key)!r} now); use another --workdir")
        return
    write_atomic(path, json.dumps(current, indent=2) + "\n")


def _first_difference(a, b, prefix=""):
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = _first_difference(x, y, prefix + key + ".")
            if found:
                return found
        elif x != y:
            return prefix + key
    return None


def _get(d, dotted):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def run(config: ConfigDict, workdir: str) -> str:
    """Stage `run`: [pretrain ->] generate -> filter -> train -> eval, skipping each stage whose artifact is
    complete, so a killed run reruns from where it stopped."""
    keep_config(config, workdir)
    stages = ((pretrain,) if toy_base(config, workdir) else ()) + (
        generate, filter, train, evaluate_stage)
    for stage in stages:
        if stage is train and nothing_kept(workdir) and not config.train.data:
            log.warning("the filter kept no input: skipping train; the report says so")
            continue
        stage(config, workdir)
    return os.path.join(workdir, "report.md")
