"""Evaluation on labelled held-out inputs (labels are used here and nowhere in distillation)."""

from __future__ import annotations

from s2d_jax.sampling import Sampler


def system1(model, tokenizer, task, examples, *, chat: bool = True, max_new_tokens: int = 32, mesh=None,
            max_batch: int = 32) -> dict:
    """The model answering each input directly (greedy): `accuracy`, `mean_tokens` (generated per input), `n`."""
    sampler = Sampler(model, tokenizer, mesh=mesh, max_batch=max_batch)
    outs = sampler.generate([task.system1_prompt(e) for e in examples], max_new_tokens=max_new_tokens, chat=chat,
                            progress=False)
    correct = sum(task.score(task.parse(s.text), e) for (s,), e in zip(outs, examples))
    return {"accuracy": correct / len(examples), "mean_tokens": sum(s.num_tokens for (s,) in outs) / len(examples),
            "n": len(examples)}


def maj_at_k(task, examples, sample_answers, ks=(1, 5, 10)) -> dict:
    """maj@k: accuracy of the majority answer over each input's first k samples (ties: the answer seen first),
    for every k in `ks` up to the number of samples."""
    import collections

    out = {}
    n = min(len(a) for a in sample_answers)
    for k in [k for k in ks if k <= n]:
        correct = 0
        for example, answers in zip(examples, sample_answers):
            counts = collections.Counter(a for a in answers[:k] if a is not None)
            if counts:
                top = max(counts.values())
                winner = next(a for a in answers[:k] if a is not None and counts[a] == top)
                correct += task.score(winner, example)
        out[f"maj@{k}"] = correct / len(examples)
    return out
