"""Supervised distillation: fine-tune the model on prompt -> target pairs, loss on target tokens only.

The step is one pure function under `jax.jit`: parameters and optimizer state in, parameters and optimizer state
out (donated), sharded by the logical-axis rules (FSDP over `fsdp`, tensor parallel over `tensor`, batch rows over
`data` x `fsdp`). Gradient accumulation is a `lax.scan` over micro-batches inside the step, and the loss is the
sum over target tokens divided by the count over the whole step, so accumulating or packing does not change it.
Mixed precision is the model config's: parameters (and so AdamW's moments) in `param_dtype`, compute in `dtype`;
full fine-tuning needs float32 parameters (bf16 ones would round most updates away). With LoRA only the adapters
(float32) are trained, held in the optimizer state and checkpointed; the base weights stay frozen in the compute
dtype. The loss never materialises `[B, T, vocab]` logits (`loss.py`).

Host side: a grain iterator feeds global batches (`jax.make_array_from_process_local_data`), metrics go to
`metrics.jsonl`, the trackers (`report.trackers`, as `TRACK/...`) and a tqdm bar, and Orbax checkpoints hold
everything needed to resume exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from s2d_jax import datasets, mesh as mesh_lib, trackers
from s2d_jax.runtime import distributed, faults, stopping
from s2d_jax.runtime import memory
from s2d_jax.artifacts import writing
from s2d_jax.errors import S2DError
from s2d_jax.model.flops import flops_per_token, process_peak
from s2d_jax.model import lora as lora_lib
from s2d_jax.model.transformer import Transformer
from s2d_jax.train import data as data_lib
from s2d_jax.train.loss import cross_entropy
from s2d_jax.train.checkpoint import Checkpoints

log = logging.getLogger("s2d.train")

SCHEDULES = ("cosine", "linear", "constant")


Preempted = stopping.Stopped  # SIGTERM or SIGINT arrived; a checkpoint of the last finished step was saved

def learning_rate_schedule(t: ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine / linear decay to `end_lr_ratio` of it, or constant."""
    if t.schedule not in SCHEDULES:
        raise S2DError(f"config key 'train.schedule': {t.schedule!r} is not one of {', '.join(SCHEDULES)}")
    peak, warmup = t.learning_rate, t.warmup_steps
    decay_steps = max(t.steps - warmup, 1)
    after = {"cosine": optax.cosine_decay_schedule(peak, decay_steps, alpha=t.end_lr_ratio),
             "linear": optax.linear_schedule(peak, peak * t.end_lr_ratio, decay_steps),
             "constant": optax.constant_schedule(peak)}[t.schedule]
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


# the train settings an optimizer is built from: equal settings give the same optimizer object (below)
OPTIMIZER_KEYS = ("learning_rate", "warmup_steps", "steps", "schedule", "end_lr_ratio", "b1", "b2", "weight_decay",
                  "clip_norm")


def make_optimizer(t: ConfigDict) -> optax.GradientTransformation:
    """AdamW (no decay on vectors: norms and biases) after global-norm clipping. The same settings give the same
    object within a process, so the trainers of a run's rounds and stages share one jitted step (`step_program`)."""
    return _optimizer(tuple(t[k] for k in OPTIMIZER_KEYS))


@functools.lru_cache(maxsize=8)
def _optimizer(key: tuple) -> optax.GradientTransformation:
    t = types.SimpleNamespace(**dict(zip(OPTIMIZER_KEYS, key)))
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    adamw = optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(t.clip_norm), adamw) if t.clip_norm > 0 else adamw


def loss_sums(model: Transformer, batch: dict, chunk: int = 0, right_padded: bool = False):
    """Summed cross-entropy over target tokens, and (correct predictions, target-token count)."""
    hidden, _ = model.forward(batch["inputs"], batch["positions"], segment_ids=batch["segment_ids"],
                              right_padded=right_padded)
    loss, correct = cross_entropy(hidden, model.head(), batch["targets"], batch["weights"], chunk,
                                  model.cfg.final_softcap)
    return loss, (correct, jnp.sum(batch["weights"]))


def train_step(graphdef, tx: optax.GradientTransformation, params, opt_state, batch, frozen=None, chunk: int = 0,
               right_padded: bool = False):
    """One optimizer step over `batch` (every leaf `[micro_steps, rows, len]`) on the trainable `params` (the
    `frozen` rest of the model, e.g. LoRA's base weights, is not differentiated); returns new params, optimizer
    state and metrics. Pure: jit it with donated params and optimizer state."""
    states = () if frozen is None else (frozen,)

    def grads_of(mb):
        grad_fn = jax.value_and_grad(
            lambda p: loss_sums(nnx.merge(graphdef, p, *states), mb, chunk, right_padded), has_aux=True)
        (loss, (correct, count)), grads = grad_fn(params)
        return grads, loss, correct, count

    def micro(carry, mb):
        return jax.tree.map(jnp.add, carry, grads_of(mb)), None

    if jax.tree.leaves(batch)[0].shape[0] == 1:  # no accumulation: no zero-filled carry, no loop
        grads, loss, correct, count = grads_of(jax.tree.map(lambda x: x[0], batch))
    else:
        zero = jnp.zeros((), jnp.float32)
        init = (jax.tree.map(jnp.zeros_like, params), zero, zero, zero)
        (grads, loss, correct, count), _ = jax.lax.scan(micro, init, batch)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss / count, "accuracy": correct / count, "grad_norm": optax.global_norm(grads),
               "target_tokens": count}
    return params, opt_state, metrics


def check_rows(t: ConfigDict, shards: int) -> int:
    """The rows of a micro-step, which must split evenly over the mesh's `shards` data shards."""
    rows = t.batch_size // t.grad_accum
    if rows % shards:
        raise S2DError(f"config key 'train.batch_size': {t.batch_size} rows / grad_accum {t.grad_accum} = {rows} "
                       f"per micro-step, not a multiple of the {shards} data shards")
    return rows


def batch_sharding(mesh, micro_rows: int) -> NamedSharding:
    """A step's batch `[micro_steps, rows, len]`: rows over the data axes."""
    return NamedSharding(mesh, P(None, mesh_lib.partition_spec(("batch",), (micro_rows,), mesh)[0], None))


def optimizer_shardings(tx: optax.GradientTransformation, params, param_shardings, mesh):
    """AdamW's moments laid out like their parameters (propagation would replicate them); scalars replicated."""
    return optax.tree_map_params(tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params), param_shardings,
                                 transform_non_params=lambda _: NamedSharding(mesh, P()))


def step_program(graphdef, tx: optax.GradientTransformation, t: ConfigDict, param_shardings, opt_shardings):
    """The jitted train step as the trainer runs it (and `s2d plan` compiles it ahead of time for a target):
    params and optimizer state donated, laid out as given. One per model structure, optimizer and layout in a
    process: `jax.jit` caches by function, and a new one traced and lowered the step again for every trainer (a
    run's rounds, its self-training and distillation; 36 s of tracing in three test files)."""
    return _step_program(graphdef, tx, t.loss_chunk, not t.pack, mesh_lib.frozen(param_shardings),
                         mesh_lib.frozen(opt_shardings))


@functools.lru_cache(maxsize=8)
def _step_program(graphdef, tx, chunk: int, right_padded: bool, param_shardings, opt_shardings):
    return jax.jit(functools.partial(train_step, graphdef, tx, chunk=chunk, right_padded=right_padded),
                   donate_argnums=(0, 1),
                   out_shardings=(mesh_lib.thawed(param_shardings), mesh_lib.thawed(opt_shardings), None))


@dataclasses.dataclass
class TrainResult:
    step: int
    metrics: dict  # the last logged row
    resumed_from: int | None


class Trainer:
    """Fine-tune `model` (in place) on the pairs of `data` (default `config.train.data`, else
    WORKDIR/distill.jsonl), writing to `workdir`: `checkpoints/`, `metrics.jsonl` and `tensorboard/`. `fit()`
    resumes from the latest checkpoint there."""

    def __init__(self, model: Transformer, tokenizer, config: ConfigDict, workdir: str, mesh=None,
                 chat: bool = True, eval_fn: Callable[[Transformer], dict] | None = None, data: str | None = None,
                 track: str = "train"):
        t = config.train
        self.t, self.workdir, self.mesh, self.eval_fn, self.track = t, workdir, mesh, eval_fn, track
        if t.steps < 1 or t.batch_size < 1 or t.grad_accum < 1 or t.max_len < 2:
            raise S2DError("config keys 'train.steps', 'train.batch_size', 'train.grad_accum' must be >= 1 and "
                           "'train.max_len' >= 2")
        if t.batch_size % t.grad_accum:
            raise S2DError(f"config key 'train.batch_size': {t.batch_size} is not a multiple of "
                           f"train.grad_accum={t.grad_accum}")
        if t.too_long not in ("drop", "error"):
            raise S2DError(f"config key 'train.too_long': {t.too_long!r} is not one of drop, error")
        self.micro_rows = check_rows(t, 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"])
        if model.cfg.remat != t.remat:  # only the top module's forward reads it; static, so set before splitting
            model.cfg = model.cfg.replace(remat=t.remat)
        if t.lora_rank:
            if not model.cfg.lora_rank:
                lora_lib.add(model, t.lora_rank, t.lora_alpha, t.lora_targets, seed=t.seed, mesh=mesh)
        elif model.cfg.param_dtype != "float32":
            raise S2DError(f"config key 'model.dtype': {model.cfg.param_dtype} parameters with full fine-tuning "
                           f"(AdamW updates at lr {t.learning_rate:g} round away in {model.cfg.param_dtype}); use "
                           f"model.dtype=float32 with model.compute_dtype={model.cfg.param_dtype}, or LoRA "
                           f"(train.lora_rank > 0)")
        self.model = model
        path = data or (datasets.resolve(t.data) if t.data else os.path.join(workdir, "distill.jsonl"))
        self.encoded = data_lib.load_pairs(path, tokenizer, max_len=t.max_len, chat=chat, too_long=t.too_long)
        self.data = data_lib.dataset(self.encoded.examples, rows=self.micro_rows * t.grad_accum,
                                     max_len=t.max_len, seed=t.seed, pack=t.pack)
        self.tx = make_optimizer(t)
        self.schedule = learning_rate_schedule(t)
        self.graphdef, state, frozen = lora_lib.split_trainable(model)
        self.params = state.to_pure_dict()
        self.frozen = None if frozen is None else frozen.to_pure_dict()
        if mesh is None:
            self.param_shardings = jax.tree.map(lambda x: x.sharding, self.params)
            self.batch_sharding = None
        else:
            self.param_shardings = mesh_lib.state_shardings(state, mesh).to_pure_dict()
            self.batch_sharding = batch_sharding(mesh, self.micro_rows)
        init = jax.jit(self.tx.init)
        if mesh is not None:
            init = jax.jit(self.tx.init, out_shardings=optimizer_shardings(self.tx, self.params, self.param_shardings,
                                                                          mesh))
        with self._mesh():
            self.opt_state = init(self.params)
        self.opt_shardings = jax.tree.map(lambda x: x.sharding, self.opt_state)
        self._step = step_program(self.graphdef, self.tx, t, self.param_shardings, self.opt_shardings)
        self.checkpoints = Checkpoints(t.checkpoint_dir or os.path.join(workdir, "checkpoints"),
                                       keep=t.keep_checkpoints)

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        t = self.t
        iterator = iter(self.data)
        step, resumed = self._restore(iterator)
        flops_token = 3 * flops_per_token(self.model.cfg, t.max_len / 2)  # forward + backward, mean context
        peak = t.peak_flops or process_peak(self.model.cfg.dtype)
        metrics_path = os.path.join(self.workdir, "metrics.jsonl")
        _truncate_metrics(metrics_path, step)
        last: dict = {}
        tokens = 0
        window_start = time.perf_counter()
        bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", disable=jax.process_index() != 0)
        try:
            with stopping.on_signals(), self._mesh():
                while step < t.steps:
                    if (signum := stopping.requested()) is not None:  # agreed: every host stops after this step
                        self._save(step, iterator, force=True)
                        self.checkpoints.wait()
                        raise stopping.Stopped(signum, f"after step {step}; checkpoint saved to "
                                                       f"{self.checkpoints.directory}")
                    with memory.program("train step", self._shapes):
                        batch = next(iterator)
                        tokens += int(np.count_nonzero(batch["segment_ids"]))
                        self.params, self.opt_state, m = self._step(self.params, self.opt_state,
                                                                    self._global(batch), self.frozen)
                        if step == 0 or step % t.log_every == t.log_every - 1:  # an error surfaces in its step
                            jax.block_until_ready(m)
                    step += 1
                    bar.update(1)
                    if step % t.log_every == 0 or step == t.steps:
                        m = jax.device_get(m)
                        seconds = time.perf_counter() - window_start
                        last = {"step": step, "loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
                                "learning_rate": float(self.schedule(step - 1)), "grad_norm": float(m["grad_norm"]),
                                "tokens_per_s": tokens / seconds,
                                "mfu": flops_token * tokens / seconds / (peak * jax.device_count())}
                        tokens, window_start = 0, time.perf_counter()
                        _write_metrics(metrics_path, self.workdir, self.track, last)
                        bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.3f}")
                    if step % t.checkpoint_every == 0 or step == t.steps:
                        self._save(step, iterator)
                    if self.eval_fn and t.eval_every and step % t.eval_every == 0:
                        try:
                            row = {"step": step, **{f"eval/{k}": v
                                                    for k, v in self.eval_fn(self.current_model()).items()}}
                        except stopping.Stopped:  # a signal during the check: the loop's top saves, then stops
                            continue
                        _write_metrics(metrics_path, self.workdir, self.track, row)
                    faults.point("train-step")
        finally:
            bar.close()
            self.checkpoints.wait()
        nnx.update(self.model, nnx.State(self.params))
        return TrainResult(step, last, resumed)

    def current_model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params, *(() if self.frozen is None else (self.frozen,)))

    # ------------------------------------------------------------------------------------------ helpers

    def _shapes(self) -> str:
        t = self.t
        return (f"{self.micro_rows} rows x {t.max_len} tokens per micro-step, {t.grad_accum} micro-step(s), "
                f"{self.model.cfg.num_params / 1e6:.0f}M parameters, {jax.device_count()} devices")

    def _mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _global(self, batch: dict) -> dict:
        """The global batch `[micro_steps, rows, len]` on the mesh, from this host's rows of it."""
        a = self.t.grad_accum
        steps = {k: v.reshape(a, self.micro_rows, *v.shape[1:]) for k, v in batch.items()}
        if self.batch_sharding is None:
            return {k: jnp.asarray(v) for k, v in steps.items()}
        lo, hi = self._host_rows
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v[:, lo:hi], v.shape)
                for k, v in steps.items()}

    @functools.cached_property
    def _host_rows(self) -> tuple[int, int]:
        """The rows `[lo, hi)` of each micro-batch that this host's devices hold (all of them on one host)."""
        index = self.batch_sharding.addressable_devices_indices_map((self.t.grad_accum, self.micro_rows, 1))
        rows = [idx[1].indices(self.micro_rows)[:2] for idx in index.values()]
        return min(r[0] for r in rows), max(r[1] for r in rows)

    def _state(self, step: int) -> dict:
        scalars = {"step": np.int32(step), "rng": np.asarray(jax.random.key_data(jax.random.key(self.t.seed)))}
        put = functools.partial(distributed.put, sharding=self.mesh and NamedSharding(self.mesh, P()))
        return {"params": self.params, "opt_state": self.opt_state, **{k: put(v) for k, v in scalars.items()}}

    def _save(self, step: int, iterator, force: bool = False) -> None:
        meta = {"step": step, "config": self.t.to_dict(), "data_pairs": len(self.encoded.examples)}
        self.checkpoints.save(step, self._state(step), iterator.get_state(), meta, force=force)

    def _restore(self, iterator) -> tuple[int, int | None]:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                self._state(0))
        found = self.checkpoints.restore_latest(abstract)
        if found is None:
            return 0, None
        step, state, data_state, _ = found
        self.params, self.opt_state = state["params"], state["opt_state"]
        iterator.set_state(data_state)
        log.info("resumed from %s/%d", self.checkpoints.directory, step)
        return step, step


def _write_metrics(path: str, workdir: str, track: str, row: dict) -> None:
    """A row of `metrics.jsonl` (the workdir's record of training), and the same to the trackers as `TRACK/...`."""
    if jax.process_index() != 0:
        return
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    trackers.log(workdir, track, {k: v for k, v in row.items() if k != "step"}, step=row["step"])


def _truncate_metrics(path: str, step: int) -> None:
    """Drop rows logged after the checkpoint a run resumes from: they are logged again, once."""
    if not os.path.exists(path) or jax.process_index() != 0:
        return
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    kept = [line for line in rows if _row_step(line) <= step]
    if len(kept) != len(rows):
        with open(path, "w") as f:
            f.writelines(kept)


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # a torn line: drop it
