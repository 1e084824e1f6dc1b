"""Stage `probe` (in `run`, after `train`, with `route.method=probe`): the probe router for this round's distilled
model, trained on the round's distillation examples the model was kept from (`route.probe_holdout`): System 1's
greedy answer to each prompt against the self-consistent System 2 answer. Saved in `WORKDIR/router/`; eval's routed system and the
next round's `route` read it."""

from __future__ import annotations

import logging
import os

import numpy as np
from ml_collections import ConfigDict

from s2d_jax import trackers
from s2d_jax.artifacts import read_jsonl
from s2d_jax.build import build_generation_mesh, build_model, build_tokenizer
from s2d_jax.relegation import probe, rounds
from s2d_jax.relegation.routing import agrees
from s2d_jax.runtime import distributed
from s2d_jax.sampling import Sampler
from s2d_jax.stages.inputs import train_data
from s2d_jax.system2.tasks import get_task

log = logging.getLogger("s2d")


def held_out_answers(config: ConfigDict, model, tok, mesh, prompts: list[str], logprobs: bool = False) -> list:
    """The distilled model's greedy answers to held-out distillation prompts, asked as the router asks (eval's
    answer budget): what the learned routers' labels compare with System 2's answers."""
    g = config.generate
    sampler = Sampler(model, tok, mesh=mesh, max_batch=g.max_batch, cache_dtype=g.cache_dtype or None)
    budget = config.eval.max_new_tokens or get_task(config.task.name).answer_tokens
    return [s for (s,) in sampler.generate(prompts, max_new_tokens=budget, chat=config.program.chat,
                                           logprobs=logprobs, progress=False)]


def train_probe(config: ConfigDict, workdir: str) -> str | None:
    if not probe.wanted(config):
        return None
    done = os.path.join(workdir, probe.DIR, probe.META)
    distilled = os.path.join(workdir, "model")
    if os.path.exists(done):
        log.info("%s is complete; skipping probe", done)
        return done
    if not os.path.exists(distilled):  # nothing distilled: the routed system's System 1 has no probe
        return None
    source = train_data(config, workdir)
    fit = os.path.join(workdir, probe.FIT)
    trained = {r["id"] for r in read_jsonl(fit, ("id",), empty_ok=True)} if os.path.exists(fit) else set()
    rows = [r for r in read_jsonl(source, ("id", "prompt", "target"), empty_ok=True) if r["id"] not in trained]
    task = get_task(config.task.name)
    name = os.path.relpath(distilled, rounds.root(workdir))
    meta = {"system1": name, "round": (rounds.info(workdir) or {}).get("round", 1), "examples": len(rows)}
    if not rows:  # nothing held out: no probe can be trained, so the routed system escalates every input
        if distributed.primary():
            probe.save({"layer": 0, "constant": 0.0, "validation": None}, workdir, meta)
        distributed.barrier(f"probe {workdir}")
        log.warning("probe: no held-out example to train on; the routed system escalates every input")
        return done
    mesh = build_generation_mesh(config)
    model = build_model(config, mesh, path=distilled, sampling=True)
    tok = build_tokenizer(config, workdir)
    prompts = [r["prompt"] for r in rows]
    samples = held_out_answers(config, model, tok, mesh, prompts, logprobs=True)
    agree = np.asarray([agrees(task.parse, s.text, r["target"]) for s, r in zip(samples, rows)], np.float32)
    x = probe.features(model, tok, prompts, samples, chat=config.program.chat)
    fitted = probe.train(x, agree, [r["id"] for r in rows], config.route.probe_layer)
    meta.update(agreeing=int(agree.sum()), source=os.path.basename(source))
    if distributed.primary():
        probe.save(fitted, workdir, meta)
    distributed.barrier(f"probe {workdir}")
    log.info("probe for %s: layer %d of %d, trained on %d held-out examples (%d agreeing with System 2)%s", name,
             fitted["layer"], model.cfg.num_layers, len(rows), int(agree.sum()),
             "" if fitted["validation"] is None else f", validation AUROC {fitted['validation']:.3f}")
    trackers.log(workdir, "probe", {"layer": fitted["layer"], "examples": len(rows), "agreeing": int(agree.sum()),
                                    **({"validation_auroc": fitted["validation"]} if fitted["validation"] is not None
                                       else {})})
    return done
