"""Evaluation on labelled held-out inputs (labels are used here and nowhere in distillation).

Each system is scored the same way: `accuracy`, `n`, `answers` (its five most frequent answers with counts: a
constant answer shows), and its cost per input: `generated_tokens` (every token
generated for the input: all stages, all samples, and USC's selection call), `prompt_tokens` (every call's
prompt, as an API would bill it), `flops` (forward matmul FLOPs of that work, from `flops.py`; a first-stage prompt
shared by N samples is read once) and `seconds` (wall clock, compile included, over the inputs); `mean_tokens`
equals `generated_tokens` (the paper's cost axis). Plus what the task adds (`Task.metrics`) and maj@k where
several System 2 samples are drawn.
"""

from __future__ import annotations

import collections
import time

from s2d_jax.flops import flops_per_token
from s2d_jax.sampling import Sampler
from s2d_jax.system2.filters import usc_select
from s2d_jax.system2.programs import run_program, stage_truncation


def call_flops(cfg, prompt: int, generated: int, read_prompt: bool = True) -> float:
    """Forward FLOPs of one call: the prompt's tokens attend to half the prompt on average, each generated token
    to the prompt and half the generation."""
    prefill = prompt * flops_per_token(cfg, prompt / 2, head=False) if read_prompt else 0.0
    return prefill + generated * flops_per_token(cfg, prompt + generated / 2)


def rollout_cost(records: list[dict], cfg) -> dict:
    """Totals over rollout records: every stage of every sample; a first-stage prompt shared by an input's samples
    is billed per sample but computed once."""
    return {"generated_tokens": sum(r["num_tokens"] for r in records),
            "prompt_tokens": sum(r["prompt_tokens"] for r in records),
            "flops": sum(call_flops(cfg, s["prompt_tokens"], s["num_tokens"], read_prompt=r["sample"] == 0 or i > 0)
                         for r in records for i, s in enumerate(r["stages"]))}


def calls_cost(samples, cfg) -> dict:
    """Totals over single calls (`Sample`s): System 1's answers, USC's selections."""
    return {"generated_tokens": sum(s.num_tokens for s in samples),
            "prompt_tokens": sum(s.prompt_tokens for s in samples),
            "flops": sum(call_flops(cfg, s.prompt_tokens, s.num_tokens) for s in samples)}


def add_cost(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def _scores(task, examples, answers, cost: dict, seconds: float) -> dict:
    n = len(examples)
    correct = sum(task.score(a, e) for a, e in zip(answers, examples))
    per = {k: v / n for k, v in cost.items()}
    top = collections.Counter("(none)" if a is None else str(a) for a in answers).most_common(5)
    return {"accuracy": correct / n, "mean_tokens": per["generated_tokens"], **per, "n": n, "seconds": seconds / n,
            "seconds_total": seconds, "answers": dict(top), **task.metrics(examples, answers)}


def system1(model, tokenizer, task, examples, *, prompt=None, chat: bool = True, max_new_tokens: int = 32,
            mesh=None, max_batch: int = 32, cache_dtype: str | None = None) -> dict:
    """The model answering each input directly (greedy); `prompt(example)` is System 1's prompt."""
    start = time.perf_counter()
    prompt = prompt or task.system1_prompt
    sampler = Sampler(model, tokenizer, mesh=mesh, max_batch=max_batch, cache_dtype=cache_dtype)
    outs = sampler.generate([prompt(e) for e in examples], max_new_tokens=max_new_tokens, chat=chat,
                            progress=False)
    answers = [task.parse(s.text) for (s,) in outs]
    out = _scores(task, examples, answers, calls_cost([s for (s,) in outs], model.cfg), time.perf_counter() - start)
    out["truncated"] = sum(s.finish_reason == "length" for (s,) in outs) / len(outs)
    return out


def system2(program, model, tokenizer, task, examples, *, samples: int = 1, chat: bool = True, seed: int = 0,
            mesh=None, max_batch: int = 32, budgets=None, params=None, select: str = "majority",
            cache_dtype: str | None = None, **sampling) -> dict:
    """The System 2 program on each input: greedy with one sample; with several, the majority answer is scored
    (or, with `select="usc"`, the sample the model picks as most consistent: USC's call is counted) and maj@k
    reported. Costs count every sample."""
    start = time.perf_counter()
    sampler = Sampler(model, tokenizer, mesh=mesh, max_batch=max_batch, cache_dtype=cache_dtype)
    if samples == 1:
        sampling = {"temperature": 0.0}
    records = run_program(program, examples, sampler, samples, parse=task.parse, seed=seed, chat=chat,
                          budgets=budgets, params=params, progress=False, **sampling)
    per_input = [records[i * samples:(i + 1) * samples] for i in range(len(examples))]
    answers = [[r["answer"] for r in rs] for rs in per_input]
    cfg = model.cfg
    cost = rollout_cost(records, cfg)
    chosen = [_majority(a) for a in answers]
    if select == "usc" and samples > 1:
        picks = usc_select(sampler, per_input, chat)
        chosen = [a[pick] if pick is not None else None for (pick, _), a in zip(picks, answers)]
        cost = add_cost(cost, calls_cost([s for _, s in picks], cfg))
    out = _scores(task, examples, chosen, cost, time.perf_counter() - start)
    out["truncation"] = stage_truncation(records)
    if samples > 1:
        out.update(maj_at_k(task, examples, answers))
    return out


def _majority(answers):
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)  # ties: the answer seen first


def maj_at_k(task, examples, sample_answers, ks=(1, 5, 10)) -> dict:
    """maj@k: accuracy of the majority answer over each input's first k samples (ties: the answer seen first),
    for every k in `ks` up to the number of samples."""
    n = min(len(a) for a in sample_answers)
    return {f"maj@{k}": sum(task.score(_majority(answers[:k]), e) for e, answers in zip(examples, sample_answers))
            / len(examples) for k in ks if k <= n}
