"""Stage `train`: distil `distill.jsonl` into the model and export it to `model/` (with `route.method=self`, then
teach it the marker on the examples it was kept from: `relegation/marker.py`)."""

from __future__ import annotations

import logging
import os
import shutil

from ml_collections import ConfigDict

from s2d_jax.runtime import distributed
from s2d_jax.relegation import marker, probe, rounds
from s2d_jax.build import build_generation_mesh, build_mesh, build_model, build_tokenizer
from s2d_jax.errors import S2DError
from s2d_jax.model import lora, quant, save_hf
from s2d_jax.stages.inputs import load_eval_inputs, system1_prompt, train_data
from s2d_jax.stages.probe import held_out_answers

log = logging.getLogger("s2d")


def train(config: ConfigDict, workdir: str) -> str:
    """Stage `train`: fine-tune the model on `train.data` (default `distill.jsonl`), checkpointing to
    `checkpoints/` and resuming from it; the final parameters are exported to `model/` (HF format; with LoRA the
    merged model, and the adapter alone to `adapter/` in PEFT's format). `model/` is written last: it marks the
    stage complete."""
    from s2d_jax import evaluate
    from s2d_jax.train import Trainer

    out = os.path.join(workdir, "model")
    if os.path.exists(out) and not _grown(config, workdir):
        log.info("%s is complete; skipping train", out)
        return out
    data = train_data(config, workdir)
    if not os.path.exists(data):
        raise S2DError(f"{data}: no such file (run `s2d filter` first, or set 'train.data')")
    if (probe.wanted(config) or marker.wanted(config)) and not config.train.data:
        data = _without_probe_examples(config, workdir, data)
    mesh = build_mesh(config)
    model = build_model(config, mesh, workdir, trainable=True, path=rounds.init_path(workdir))
    tok = build_tokenizer(config, workdir)
    eval_fn = None
    if config.train.eval_every:
        task, examples = load_eval_inputs(config)

        def eval_fn(m):  # on the generation mesh: the trained weights copied there on device, training's untouched
            m, target = decoding(config, m, mesh)
            return evaluate.system1(m, tok, task, examples, chat=config.program.chat,
                                    prompt=lambda x: system1_prompt(config, task, x),
                                    max_new_tokens=config.eval.max_new_tokens or task.answer_tokens,
                                    mesh=target, max_batch=config.generate.max_batch)
    result = Trainer(model, tok, config, workdir, mesh=mesh, chat=config.program.chat, eval_fn=eval_fn,
                     data=data).fit()
    log.info("trained %d steps: %s", result.step, {k: round(v, 4) for k, v in result.metrics.items()})
    if marker.wanted(config) and not config.train.data:
        _learn_marker(config, workdir, model, tok, mesh, data)
    if config.train.lora_rank:
        adapter = os.path.join(workdir, "adapter")  # one left by a run killed before model/ is replaced
        lora.save_peft(model, adapter, base_model=config.model.path, overwrite=True)
        log.info("wrote %s (LoRA rank %d on %s)", adapter, config.train.lora_rank, ", ".join(config.train.lora_targets))
    save_hf(model, out, tokenizer=tok)
    log.info("wrote %s", out)
    return out


def decoding(config: ConfigDict, model, mesh) -> tuple:
    """(model, its mesh) for sampling from a model in training: its weights copied onto the generation
    mesh on device (training's untouched) and quantised as `generate.weights_dtype` says."""
    from s2d_jax.sampling.reshard import reshard

    target = build_generation_mesh(config)
    m = quant.quantize(model if target == mesh else reshard(model, target), config.generate.weights_dtype)
    return m, target


def _learn_marker(config: ConfigDict, workdir: str, model, tok, mesh, fit: str) -> None:
    """`route.method=self`: the distilled model answers the held-out examples (greedy, as it will be routed); those
    it answers unlike System 2 get the marker as their target, and training goes on for `route.self_steps` steps on
    every example (WORKDIR/self/: `train.jsonl`, the targets, written once; its own checkpoints and metrics), so the
    model keeps its answers and asks for System 2 where it was wrong."""
    import json

    from s2d_jax.artifacts import read_jsonl, write_atomic
    from s2d_jax.system2.tasks import get_task
    from s2d_jax.train import Trainer

    here = os.path.join(workdir, marker.DIR)
    targets = os.path.join(here, "train.jsonl")
    rows = read_jsonl(fit, ("id", "prompt", "target"))
    kept = {r["id"] for r in rows}
    held = [r for r in read_jsonl(train_data(config, workdir), ("id", "prompt", "target")) if r["id"] not in kept]
    if not held:
        log.warning("route.method=self: no held-out example to learn the marker from; the model never asks for "
                    "System 2 (raise route.probe_holdout or the pool)")
        return
    if not os.path.exists(targets):
        m, target = decoding(config, model, mesh)
        said = [s.text for s in held_out_answers(config, m, tok, target, [r["prompt"] for r in held])]
        held = marker.self_targets(held, said, get_task(config.task.name).parse, config.route.marker)
        if distributed.primary():
            os.makedirs(here, exist_ok=True)
            write_atomic(targets, "".join(json.dumps(r) + "\n" for r in rows + held))
        distributed.barrier(f"marker targets {workdir}")
    held = [r for r in read_jsonl(targets, ("id",)) if r.get("marked") is not None]
    up = sum(r["marked"] for r in held)
    log.info("route.method=self: the model answered %d of %d held-out examples unlike System 2; %d steps teach it "
             "%r there", up, len(held), config.route.self_steps, config.route.marker)
    sub = ConfigDict(config.to_dict())
    sub.train.update(data=targets, checkpoint_dir="", steps=config.route.self_steps, warmup_steps=0, eval_every=0,
                     checkpoint_every=min(config.train.checkpoint_every, config.route.self_steps),
                     log_every=min(config.train.log_every, config.route.self_steps))
    result = Trainer(model, tok, sub, here, mesh=mesh, chat=config.program.chat, data=targets, track="self").fit()
    log.info("self: trained %d steps: %s", result.step, {k: round(v, 4) for k, v in result.metrics.items()})


def _grown(config: ConfigDict, workdir: str) -> bool:
    """Whether `train.steps` grew past the finished run's last checkpoint (the workdir's kept config allows it):
    then the export and what was evaluated on it are retired (eval.json first: it marks eval complete), and
    training continues from that checkpoint."""
    from s2d_jax.train.checkpoint import latest_step

    trained = latest_step(config.train.checkpoint_dir or os.path.join(workdir, "checkpoints"))
    if trained is None or trained >= config.train.steps:
        return False
    log.info("model/ was trained for %d steps; train.steps is %d: continuing from checkpoint %d", trained,
             config.train.steps, trained)
    if distributed.primary():
        for name in ("eval.json", "report.md", "report.png", "report_flops.png", "adapter", marker.DIR, "model"):
            path = os.path.join(workdir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    distributed.barrier(f"retire {workdir}/model")
    return True


def _without_probe_examples(config: ConfigDict, workdir: str, data: str) -> str:
    """With the probe router: the examples the model trains on, `probe.FIT` (those `probe.held_out` keeps back
    train the probe; all of them when none would be left)."""
    import json

    from s2d_jax.artifacts import read_jsonl, write_atomic

    rows = read_jsonl(data, ("id", "prompt", "target"))
    kept = [r for r in rows if not probe.held_out(r["id"], config.route.probe_holdout)] or rows
    out = os.path.join(workdir, probe.FIT)
    if distributed.primary():
        write_atomic(out, "".join(json.dumps(r) + "\n" for r in kept))
    distributed.barrier(f"probe split {workdir}")
    log.info("train: %d of %d examples (the other %d are held out for the %s router)", len(kept), len(rows),
             len(rows) - len(kept), config.route.method if config.route.method in ("probe", "self") else "probe")
    return out


def nothing_to_train(config: ConfigDict, workdir: str) -> bool:
    """True when the training set is there and empty (the filter, and in a loop every round so far, kept nothing)."""
    path = train_data(config, workdir)
    return os.path.exists(path) and os.path.getsize(path) == 0
