"""Evaluation on labelled held-out inputs (labels are used here and nowhere in distillation).

Each system is scored the same way: `accuracy`, `mean_tokens` (tokens generated per input, every stage counted),
`n`, `seconds` (wall clock, compile included), plus what the task adds (`Task.metrics`: per-template accuracy,
agreement without ties, position inconsistency, ...) and maj@k where several System 2 samples are drawn.
"""

from __future__ import annotations

import collections
import time

from s2d_jax.sampling import Sampler
from s2d_jax.system2.programs import run_program


def _scores(task, examples, answers, tokens, seconds) -> dict:
    correct = sum(task.score(a, e) for a, e in zip(answers, examples))
    return {"accuracy": correct / len(examples), "mean_tokens": sum(tokens) / len(examples), "n": len(examples),
            "seconds": seconds, **task.metrics(examples, answers)}


def system1(model, tokenizer, task, examples, *, chat: bool = True, max_new_tokens: int = 32, mesh=None,
            max_batch: int = 32) -> dict:
    """The model answering each input directly (greedy)."""
    start = time.perf_counter()
    sampler = Sampler(model, tokenizer, mesh=mesh, max_batch=max_batch)
    outs = sampler.generate([task.system1_prompt(e) for e in examples], max_new_tokens=max_new_tokens, chat=chat,
                            progress=False)
    answers = [task.parse(s.text) for (s,) in outs]
    return _scores(task, examples, answers, [s.num_tokens for (s,) in outs], time.perf_counter() - start)


def system2(program, model, tokenizer, task, examples, *, samples: int = 1, chat: bool = True, seed: int = 0,
            mesh=None, max_batch: int = 32, max_new_tokens: int | None = None, **sampling) -> dict:
    """The System 2 program on each input: greedy with one sample; with several, the majority answer is scored
    (and maj@k reported), and `mean_tokens` is the cost of one program run."""
    start = time.perf_counter()
    sampler = Sampler(model, tokenizer, mesh=mesh, max_batch=max_batch)
    if samples == 1:
        sampling = {"temperature": 0.0}
    records = run_program(program, examples, sampler, samples, parse=task.parse, seed=seed, chat=chat,
                          max_new_tokens=max_new_tokens, progress=False, **sampling)
    per_input = [records[i * samples:(i + 1) * samples] for i in range(len(examples))]
    answers = [[r["answer"] for r in rs] for rs in per_input]
    tokens = [sum(r["num_tokens"] for r in rs) / samples for rs in per_input]
    out = _scores(task, examples, [_majority(a) for a in answers], tokens, time.perf_counter() - start)
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
