"""The sampler's KV cache on device: the prefill that fills it, resizing to the live slots, per-sample keys.

The cache is `KVCache` (model/transformer.py): per layer `[rows, kv_heads, slots, head_dim]`, rows over the data
axes and kv heads over `tensor` (CACHE_AXES, constrained explicitly). It holds only the slots that can hold
tokens yet (prompt bucket + a few LIVE_BUCKETs; past GEOMETRIC slots, four widths per octave), resized between decode
calls, so attention reads no empty slots. The bucket functions here bound every shape the engine compiles.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2d_jax import mesh as mesh_lib
from s2d_jax.model.transformer import KVCache, cache_slots

CACHE_AXES = ("batch", "kv_heads", None, None)
LIVE_BUCKET = 128  # the cache's width steps, up to GEOMETRIC slots; past it four steps per octave
GEOMETRIC = 1024
TRACES = [0]  # jit traces of the sampler's device functions, process-wide: tests count compilations with it


def bucket(x: int, smallest: int) -> int:
    """The power of two at or above `x` (at least `smallest`): the sizes shapes are padded to, so compiles stay few."""
    return max(smallest, 1 << math.ceil(math.log2(max(x, 1))))


def quarter_octave(x: int, smallest: int) -> int:
    """`x` rounded up to four steps per octave past `smallest` (a power of two; 33 -> 40, 1,025 -> 1,280): a
    prompt pads by under a quarter, and a context of C tokens has about 4 log2(C / smallest) such shapes."""
    if x <= smallest:
        return smallest
    step = max(1, (1 << (math.ceil(math.log2(x)) - 1)) // 4)
    return -(-x // step) * step


def length_bucket(x: int, smallest: int) -> int:
    """A prompt's padded length: four buckets per octave past `smallest` (at least 32, or a power of two below)."""
    return quarter_octave(x, bucket(smallest, 1))


def width_bucket(x: int) -> int:
    """The cache width holding `x` slots: LIVE_BUCKET steps up to GEOMETRIC, then four per octave (a 128k context
    has 36 widths, not 1,000)."""
    return -(-x // LIVE_BUCKET) * LIVE_BUCKET if x <= GEOMETRIC else quarter_octave(x, GEOMETRIC)


def row_chunks(rows: int, multiple: int = 1) -> list[int]:
    """Prefill row counts for `rows` prompts: powers of two times `multiple` (the mesh's row divisor), largest
    first, padded up only where that wastes at most a quarter (7 -> [8], 5 -> [4, 1], 6 -> [4, 2]): a prefill's cost
    is its rows, so padding 5 prompts to 8 paid 60% more."""
    units, out = -(-rows // multiple), []
    while units:
        up = bucket(units, 1)
        if up - units <= units // 4:
            out.append(up)
            break
        out.append(up // 2)
        units -= up // 2
    return [u * multiple for u in out]


def constrain(cache: KVCache) -> KVCache:
    pin = lambda x: mesh_lib.constrain(x, CACHE_AXES)  # (an int8 layer's scales `[B, K, S]` too)
    return cache._replace(k=tuple(jax.tree.map(pin, k) for k in cache.k), v=tuple(jax.tree.map(pin, v) for v in cache.v))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "dtype"))
def prefill(graphdef, state, tokens, positions, segments, max_len: int, dtype: str | None = None):
    """Prefill `[B, P]` left-padded prompts; return next-token logits and a cache of `max_len` slots in `dtype`
    (default: the compute dtype; the engine copies each row into as many slots as its prompt has samples)."""
    TRACES[0] += 1
    model = nnx.merge(graphdef, state)
    hidden, kvs = model.forward(tokens, positions, segment_ids=segments)
    logits = model.logits(hidden[:, -1])  # left padding: every prompt ends at the last column
    cache = KVCache.from_prefill(model.cfg, kvs, segments != 0, max_len, jnp.dtype(dtype or model.cfg.dtype),
                                 lambda x: mesh_lib.constrain(x, CACHE_AXES))
    return logits, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "dtype"))
def prefill_shared(graphdef, state, prefix, prefix_positions, prefix_segments, owner, tokens, positions, segments,
                   last, dtype: str | None = None):
    """Prefill prompts that share prefixes: each distinct prefix once (`[U, Lp]`, left-padded), then every
    prompt's suffix (`[R, Ls]`, right-padded) against a copy of its prefix's (`owner[r]`) cache rows. Returns the
    logits at each suffix's last token (`last[r]`) and a cache of `Lp + Ls` slots in which each row's tokens are
    contiguous (prefix, then suffix) and its next slot is its own (`Lp + last[r] + 1`), so positions and slots
    advance together as in a plain prefill (sliding windows count slots)."""
    TRACES[0] += 1
    model = nnx.merge(graphdef, state)
    cfg, dtype = model.cfg, jnp.dtype(dtype or model.cfg.dtype)
    _, kvs = model.forward(prefix, prefix_positions, segment_ids=prefix_segments)
    width = prefix.shape[1] + tokens.shape[1]
    work = jnp.dtype(cfg.dtype) if dtype == jnp.int8 else dtype  # the suffix pass's cache (int8: stored after)
    grow = lambda x: mesh_lib.constrain(jnp.pad(x[owner].astype(work), ((0, 0), (0, 0), (0, tokens.shape[1]),
                                                                        (0, 0))), CACHE_AXES)
    cache = KVCache(tuple(grow(k) for k, _ in kvs), tuple(grow(v) for _, v in kvs),
                    jnp.pad(prefix_segments[owner] != 0, ((0, 0), (0, tokens.shape[1]))), jnp.int32(prefix.shape[1]))
    hidden, cache = model.forward(tokens, positions, segment_ids=segments, cache=cache)
    rows = jnp.arange(tokens.shape[0])
    logits = model.logits(hidden[rows, last])
    end = prefix.shape[1] + last + 1
    return logits, KVCache.from_prefill(cfg, zip(cache.k, cache.v), cache.valid, width, dtype,
                                        lambda x: mesh_lib.constrain(x, CACHE_AXES), end=end)


def layer_sizes(cfg, width: int) -> tuple[int, ...]:
    """`(width, each layer's slots)`: a sliding layer's stops at its window (up to then a plain cache)."""
    return (width,) + tuple(cache_slots(cfg, n, width) for n in range(cfg.num_layers))


def resize(cache: KVCache, sizes: tuple[int, ...]) -> KVCache:
    """The cache with `sizes[0]` slots (each layer `sizes[1 + n]`): padded with empty slots, or cut where every
    row's written slots lie below the cut (the caller's promise)."""
    fit = lambda x, n, axis: (jnp.pad(x, [(0, max(0, n - x.shape[axis])) if a == axis else (0, 0)
                                          for a in range(x.ndim)])
                              if n >= x.shape[axis] else jax.lax.slice_in_dim(x, 0, n, axis=axis))
    layer = lambda c, n: jax.tree.map(lambda x: fit(x, n, 2), c)
    return constrain(KVCache(tuple(layer(k, n) for k, n in zip(cache.k, sizes[1:])),
                             tuple(layer(v, n) for v, n in zip(cache.v, sizes[1:])),
                             fit(cache.valid, sizes[0], 1), cache.index))


def sample_keys(seeds, prompt_ids, sample_ids) -> jax.Array:
    """One key per (seed, prompt key, sample index): a sample's draws depend on nothing else (not its batch, slot
    or the time it was queued). Rows are padded to a power of two, so compiles stay few."""
    n = len(sample_ids)
    size = bucket(n, 1)
    pad = lambda x: np.pad(np.asarray(x, np.int64).astype(np.uint32), (0, size - n))
    return _keys(pad(np.broadcast_to(seeds, (n,))), pad(prompt_ids), pad(sample_ids))[:n]


@jax.jit
def _keys(seeds, prompt_ids, sample_ids):
    make = lambda seed, p, s: jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), p), s)
    return jax.vmap(make)(seeds, prompt_ids, sample_ids)
