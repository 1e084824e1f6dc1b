"""Stage `pretrain` (toy base models, the CPU demo): a random preset trained on the task's synthetic corpus."""

from __future__ import annotations

import json
import logging
import os

from ml_collections import ConfigDict

from s2d_jax.artifacts import write_atomic
from s2d_jax.build import build_mesh, build_model, build_tokenizer
from s2d_jax.errors import S2DError
from s2d_jax.model import save_hf
from s2d_jax.system2.programs import get_program
from s2d_jax.system2.tasks import get_task
from s2d_jax.tokenizer import SYLLABLES, syllable_tokenizer

log = logging.getLogger("s2d")


def pretrain(config: ConfigDict, workdir: str) -> str:
    """Stage `pretrain` (toy base models, the CPU demo): train `model.preset` from random init on the task's
    synthetic corpus (step-by-step answers for every list length, direct answers only for short ones) with the
    same trainer, and write the base model to WORKDIR/base."""
    from s2d_jax.train import Trainer

    p = config.pretrain
    out = os.path.join(workdir, "base")
    if p.steps <= 0:
        raise S2DError("config key 'pretrain.steps': 0, so there is no toy base model to pretrain")
    if config.model.path:
        raise S2DError("config key 'pretrain.steps' > 0 with 'model.path' set: pretraining starts from a random "
                       "'model.preset', not a checkpoint")
    if os.path.exists(out):
        log.info("%s is complete; skipping pretrain", out)
        return out
    task = get_task(config.task.name)
    if not hasattr(task, "corpus"):
        raise S2DError(f"config key 'pretrain.steps': task {task.name!r} has no synthetic corpus to pretrain on")
    here = os.path.join(workdir, "pretrain")
    os.makedirs(here, exist_ok=True)
    corpus = os.path.join(here, "corpus.jsonl")
    rows = task.corpus(p.corpus_size, p.seed, get_program(config.program.name).stages[0].template,
                       cot_max_words=p.cot_max_words, direct_max_words=p.direct_max_words,
                       direct_share=p.direct_share, guess_share=p.guess_share)
    write_atomic(corpus, "".join(json.dumps(r) + "\n" for r in rows))
    if config.tokenizer == SYLLABLES:
        if not hasattr(task, "syllables"):
            raise S2DError(f"config key 'tokenizer': {SYLLABLES!r} needs a task of made-up words; {task.name!r} "
                           f"has no syllables")
        tok = syllable_tokenizer(task.syllables, [r["prompt"] for r in rows])
    else:
        tok = build_tokenizer(config)
    sub = ConfigDict(config.to_dict())
    sub.train.update(data=corpus, checkpoint_dir="", steps=p.steps, batch_size=p.batch_size,
                     learning_rate=p.learning_rate, max_len=p.max_len, warmup_steps=p.warmup_steps, seed=p.seed,
                     pack=p.pack, eval_every=0, lora_rank=0,
                     checkpoint_every=max(p.steps // 4, 1), log_every=max(min(p.steps // 20, 50), 1),
                     schedule="cosine", end_lr_ratio=0.1)
    mesh = build_mesh(config)
    model = build_model(config, mesh, base=False, tokenizer=tok, trainable=True)
    result = Trainer(model, tok, sub, here, mesh=mesh, chat=config.program.chat, track="pretrain").fit()
    log.info("pretrained %d steps: loss %.4f, token accuracy %.3f", result.step, result.metrics.get("loss", 0),
             result.metrics.get("accuracy", 0))
    save_hf(model, out, tokenizer=tok)
    log.info("wrote %s", out)
    return out
