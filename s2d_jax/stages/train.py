"""Stage `train`: distil `distill.jsonl` into the model and export it to `model/`."""

from __future__ import annotations

import logging
import os
import shutil

from ml_collections import ConfigDict

from s2d_jax import datasets
from s2d_jax.runtime import distributed
from s2d_jax.relegation import probe, rounds
from s2d_jax.build import build_generation_mesh, build_mesh, build_model, build_tokenizer
from s2d_jax.errors import S2DError
from s2d_jax.model import lora, quant, save_hf
from s2d_jax.stages.inputs import load_eval_inputs, system1_prompt

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
    if probe.wanted(config) and not config.train.data:
        data = _without_probe_examples(config, workdir, data)
    mesh = build_mesh(config)
    model = build_model(config, mesh, workdir, trainable=True, path=rounds.init_path(workdir))
    tok = build_tokenizer(config, workdir)
    eval_fn = None
    if config.train.eval_every:
        task, examples = load_eval_inputs(config)
        decoding = build_generation_mesh(config)

        def eval_fn(m):  # on the generation mesh: the trained weights copied there on device, training's untouched
            from s2d_jax.sampling.reshard import reshard

            m = quant.quantize(m if decoding == mesh else reshard(m, decoding), config.generate.weights_dtype)
            return evaluate.system1(m, tok, task, examples, chat=config.program.chat,
                                    prompt=lambda x: system1_prompt(config, task, x),
                                    max_new_tokens=config.eval.max_new_tokens or task.answer_tokens,
                                    mesh=decoding, max_batch=config.generate.max_batch)
    result = Trainer(model, tok, config, workdir, mesh=mesh, chat=config.program.chat, eval_fn=eval_fn,
                     data=data).fit()
    log.info("trained %d steps: %s", result.step, {k: round(v, 4) for k, v in result.metrics.items()})
    if config.train.lora_rank:
        adapter = os.path.join(workdir, "adapter")  # one left by a run killed before model/ is replaced
        lora.save_peft(model, adapter, base_model=config.model.path, overwrite=True)
        log.info("wrote %s (LoRA rank %d on %s)", adapter, config.train.lora_rank, ", ".join(config.train.lora_targets))
    save_hf(model, out, tokenizer=tok)
    log.info("wrote %s", out)
    return out


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
        for name in ("eval.json", "report.md", "report.png", "report_flops.png", "adapter", "model"):
            path = os.path.join(workdir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    distributed.barrier(f"retire {workdir}/model")
    return True


def train_data(config: ConfigDict, workdir: str) -> str:
    """What `train` fine-tunes on: `train.data`, or in a round with `loop.accumulate` every round's kept examples
    so far (`train.jsonl`, written by the loop), else the workdir's own `distill.jsonl`."""
    if config.train.data:
        return datasets.resolve(config.train.data)
    pooled = os.path.join(workdir, "train.jsonl")
    return pooled if os.path.exists(pooled) else os.path.join(workdir, "distill.jsonl")


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
    log.info("train: %d of %d examples (the other %d train the probe router)", len(kept), len(rows),
             len(rows) - len(kept))
    return out


def nothing_to_train(config: ConfigDict, workdir: str) -> bool:
    """True when the training set is there and empty (the filter, and in a loop every round so far, kept nothing)."""
    path = train_data(config, workdir)
    return os.path.exists(path) and os.path.getsize(path) == 0
