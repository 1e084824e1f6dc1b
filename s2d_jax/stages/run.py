"""Stage `run`: every stage in order, each skipped when its artifact is complete (the workdir's guards, its lock
and kept config, are taken by the command line: `s2d_jax.workdir.claim`)."""

from __future__ import annotations

import logging
import os

from ml_collections import ConfigDict

from s2d_jax import stopping
from s2d_jax.build import toy_base
from s2d_jax.stages.eval import evaluate_stage, nothing_kept
from s2d_jax.stages.filter import filter
from s2d_jax.stages.generate import generate
from s2d_jax.stages.pretrain import pretrain
from s2d_jax.stages.train import train

log = logging.getLogger("s2d")


def run(config: ConfigDict, workdir: str) -> str:
    """Stage `run`: [pretrain ->] generate -> filter -> train -> eval, skipping each stage whose artifact is
    complete, so a killed run reruns from where it stopped."""
    stages = ((("pretrain", pretrain),) if toy_base(config, workdir) else ()) + (
        ("generate", generate), ("filter", filter), ("train", train), ("eval", evaluate_stage))
    for name, stage in stages:
        if stage is train and nothing_kept(workdir) and not config.train.data:
            log.warning("the filter kept no input: skipping train; the report says so")
            continue
        stage(config, workdir)
        stopping.check(f"after {name}")
    return os.path.join(workdir, "report.md")
