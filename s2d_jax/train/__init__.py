"""Distillation training: grain data, an Optax step under jit on a mesh, Orbax checkpoints."""

from s2d_jax.train.trainer import Preempted, Trainer, TrainResult, make_optimizer, train_step

__all__ = ["Preempted", "Trainer", "TrainResult", "make_optimizer", "train_step"]
