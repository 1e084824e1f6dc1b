"""The stages of `s2d`, one module each: each is a function of (config, workdir) that writes its artifact
atomically and skips itself when that artifact is complete."""

from s2d_jax.stages.convert import convert
from s2d_jax.stages.eval import evaluate_stage
from s2d_jax.stages.filter import filter  # noqa: A004 (the stage's name)
from s2d_jax.stages.generate import generate
from s2d_jax.stages.plan import plan_stage
from s2d_jax.stages.pretrain import pretrain
from s2d_jax.stages.route import route
from s2d_jax.stages.run import run
from s2d_jax.stages.train import train

STAGES = {"plan": plan_stage, "convert": convert, "pretrain": pretrain, "route": route, "generate": generate,
          "filter": filter, "train": train, "eval": evaluate_stage, "run": run}

__all__ = ["STAGES", "convert", "evaluate_stage", "filter", "generate", "plan_stage", "pretrain", "route", "run",
           "train"]
