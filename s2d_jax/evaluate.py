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
