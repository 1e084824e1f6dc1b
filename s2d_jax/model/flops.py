"""FLOP counts and a measured matmul peak: the yardsticks for MFU in the trainer's metrics and the benchmarks."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp


def matmul_peak(dtype="float32", reps: int = 5) -> float:
    """The best matmul rate (FLOP/s) over a few large shapes on the default device, measured now."""
    best = 0.0
    f = jax.jit(lambda a, b: a @ b)
    shapes = [(2048, 2048, 2048), (4096, 576, 1536), (8192, 576, 3072)]
    if jax.default_backend() != "cpu":  # an accelerator needs a large product to reach its peak
        shapes.append((8192, 8192, 8192))
    for m, k, n in shapes:
        keys = jax.random.split(jax.random.key(0))  # random, not constant: some chips run faster on zeros
        a, b = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key, shape in zip(keys, ((m, k), (k, n))))
        f(a, b).block_until_ready()
        t = time.perf_counter()
        for _ in range(reps):
            f(a, b).block_until_ready()
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


def process_peak(dtype="float32") -> float:
    """`matmul_peak` measured once per process, backend and dtype: the trainer's MFU yardstick (a run that trains
    several times, rounds or stages, measures it once; a benchmark that wants it measured now calls
    `matmul_peak`)."""
    return _process_peak(jax.default_backend(), str(jnp.dtype(dtype)))


@functools.cache
def _process_peak(backend: str, dtype: str) -> float:
    return matmul_peak(dtype, reps=2)


def flops_per_token(cfg, context: float, head: bool = True) -> float:
    """Forward matmul FLOPs of one token: 2 x layer parameters, + attention over `context`, + the LM head if
    computed. A training step costs about 3x this (forward + backward)."""
    embed = cfg.vocab_size * cfg.hidden_size
    layers = cfg.num_params - embed * (1 if cfg.tie_embeddings else 2)
    seen = sum(min(context, cfg.window(n) or context) for n in range(cfg.num_layers))  # sliding layers: window
    return 2 * layers + 4 * cfg.num_heads * cfg.head_dim * seen + (2 * embed if head else 0)
