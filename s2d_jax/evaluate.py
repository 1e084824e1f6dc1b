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

from s2d_jax.relegation import routing
from s2d_jax.relegation.marker import confidence as self_confidence, marked
from s2d_jax.model.flops import flops_per_token
from s2d_jax.sampling import Sampler
from s2d_jax.system2.filters import majority, usc_select
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


def calls_cost(samples, cfg, shared_prompt: bool = False) -> dict:
    """Totals over calls (`Sample`s): System 1's answers, USC's selections; `shared_prompt`: the samples of one
    prompt (the router's), billed per sample but computed once."""
    return {"generated_tokens": sum(s.num_tokens for s in samples),
            "prompt_tokens": sum(s.prompt_tokens for s in samples),
            "flops": sum(call_flops(cfg, s.prompt_tokens, s.num_tokens, read_prompt=not shared_prompt or j == 0)
                         for j, s in enumerate(samples))}


def add_cost(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def _scores(task, examples, answers, cost: dict, seconds: float, per_input: list[dict] | None = None) -> dict:
    """A system's scores; `per_input` (each input's cost) adds `per_input` rows (id, answer, correct, cost) that
    the routed system and `eval_inputs.jsonl` are made of."""
    n = len(examples)
    correct = [bool(task.score(a, e)) for a, e in zip(answers, examples)]
    per = {k: v / n for k, v in cost.items()}
    top = collections.Counter("(none)" if a is None else str(a) for a in answers).most_common(5)
    out = {"accuracy": sum(correct) / n, "mean_tokens": per["generated_tokens"], **per, "n": n, "seconds": seconds / n,
           "seconds_total": seconds, "answers": dict(top), **task.metrics(examples, answers)}
    if per_input is not None:
        out["per_input"] = [{"id": e.id, "answer": a, "correct": c, **cost}
                            for e, a, c, cost in zip(examples, answers, correct, per_input)]
    return out


def system1(model, tokenizer, task, examples, *, prompt=None, chat: bool = True, max_new_tokens: int = 32,
            mesh=None, max_batch: int = 32, cache_dtype: str | None = None) -> dict:
    """The model answering each input directly (greedy); `prompt(example)` is System 1's prompt."""
    start = time.perf_counter()
    prompt = prompt or task.system1_prompt
    sampler = Sampler(model, tokenizer, mesh=mesh, max_batch=max_batch, cache_dtype=cache_dtype)
    outs = sampler.generate([prompt(e) for e in examples], max_new_tokens=max_new_tokens, chat=chat,
                            progress=False)
    samples = [s for (s,) in outs]
    answers = [task.parse(s.text) for s in samples]
    costs = [calls_cost([s], model.cfg) for s in samples]
    out = _scores(task, examples, answers, calls_cost(samples, model.cfg), time.perf_counter() - start, costs)
    out["truncated"] = sum(s.finish_reason == "length" for s in samples) / len(samples)
    return out


def router(model, tokenizer, task, examples, *, method: str, samples: int = 4, temperature: float = 0.7,
           seed: int = 0, prompt=None, chat: bool = True, max_new_tokens: int = 32, mesh=None, max_batch: int = 32,
           cache_dtype: str | None = None, stop=None, probe: dict | None = None, marker: str | None = None
           ) -> tuple[list[dict], float]:
    """System 1 asked for its answer and its confidence in it (no labels read): per input `id`, `answer`, the
    `text` that gave it, `confidence` and the cost of asking; and the wall seconds. `agreement`: `samples` samples, the answer their
    majority, the confidence the share giving it; `logprob`: the greedy answer and its per-token probability;
    `probe`: the greedy answer and the probe's probability that it is System 2's (one more forward pass over prompt
    and answer, billed; without a trained probe, confidence 0: every input goes to System 2, whose answers train
    it); `self`: the greedy answer, no answer and confidence 0 when it is the `marker` (`relegation.marker`; None:
    a model never taught it, every input escalates).
    Samples are keyed by the input's id, so an input gets the same ones whatever else is in the call."""
    start = time.perf_counter()
    prompt = prompt or task.system1_prompt
    sampler = Sampler(model, tokenizer, mesh=mesh, max_batch=max_batch, cache_dtype=cache_dtype)
    prompts = [prompt(e) for e in examples]
    if method == "agreement":
        outs = sampler.generate(prompts, n=samples, temperature=temperature, seed=seed, max_new_tokens=max_new_tokens,
                                chat=chat, progress=False, prompt_keys=[routing.input_key(e.id) for e in examples],
                                stop=stop)
    else:
        outs = sampler.generate(prompts, max_new_tokens=max_new_tokens, chat=chat, progress=False, logprobs=True,
                                stop=stop)
    if method == "probe":
        probed = _probe_confidence(model, tokenizer, prompts, [g[0] for g in outs], chat, probe)
    rows = []
    for k, (e, group) in enumerate(zip(examples, outs)):
        parsed = [task.parse(s.text) for s in group]
        if method == "agreement":
            answer, confidence = routing.agreement(parsed)
        elif method == "probe":
            answer, confidence = parsed[0], probed[k]
        elif method == "self":  # a marked answer is no answer
            said = group[0]
            if marker is not None and marked(said.text, marker):
                parsed[0] = None
            answer, confidence = parsed[0], self_confidence(said.text, said.logprobs, marker)
        else:
            answer, confidence = parsed[0], routing.token_probability(group[0].logprobs)
        cost = calls_cost(group, model.cfg, shared_prompt=True)
        if method == "probe" and probe is not None:  # the probe's pass over prompt and answer
            s = group[0]
            cost["flops"] += call_flops(model.cfg, s.prompt_tokens + s.num_tokens, 0)
        rows.append({"id": e.id, "answer": answer, "text": group[parsed.index(answer)].text,
                     "confidence": confidence, **cost})
    return rows, time.perf_counter() - start


def _probe_confidence(model, tokenizer, prompts, samples, chat, probe) -> list[float]:
    from s2d_jax.relegation import probe as probe_lib

    if probe is None:
        return [0.0] * len(samples)
    x = probe_lib.features(model, tokenizer, prompts, samples, chat=chat)
    return [float(p) for p in probe_lib.predict(probe, x[:, probe["layer"]])]


def routed_system1(model, tokenizer, task, examples, **router_args) -> dict:
    """The router's System 1 scored on labelled inputs: its answers' accuracy and cost, with per-input rows
    (`confidence` included) for `routing.routed`."""
    rows, seconds = router(model, tokenizer, task, examples, **router_args)
    out = _scores(task, examples, [r["answer"] for r in rows], routing.total(rows),
                  seconds, [{k: r[k] for k in routing.COSTS} for r in rows])
    for row, r in zip(out["per_input"], rows):
        row["confidence"] = r["confidence"]
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
    costs = [rollout_cost(rs, cfg) for rs in per_input]
    chosen = [majority(a) for a in answers]
    if select == "usc" and samples > 1:
        picks = usc_select(sampler, per_input, chat)
        chosen = [a[pick] if pick is not None else None for (pick, _), a in zip(picks, answers)]
        costs = [add_cost(c, calls_cost([s], cfg)) for c, (_, s) in zip(costs, picks)]
    out = _scores(task, examples, chosen, routing.total(costs), time.perf_counter() - start, costs)
    out["truncation"] = stage_truncation(records)
    if samples > 1:
        out.update(maj_at_k(task, examples, answers))
    return out


def maj_at_k(task, examples, sample_answers, ks=(1, 5, 10)) -> dict:
    """maj@k: accuracy of the majority answer over each input's first k samples (ties: the answer seen first),
    for every k in `ks` up to the number of samples."""
    n = min(len(a) for a in sample_answers)
    return {f"maj@{k}": sum(task.score(majority(answers[:k]), e) for e, answers in zip(examples, sample_answers))
            / len(examples) for k in ks if k <= n}
