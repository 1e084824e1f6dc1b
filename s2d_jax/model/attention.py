"""One attention function for every caller (training, the plain forward, prefill, decode), kernel by backend.

Which keys a query sees is described by `Mask`, never by a materialised `[T, S]` matrix: segment ids (0 =
padding; a key is seen only inside the query's segment), slots (causality: a query at slot t sees slots <= t) and
an optional sliding window (t - s < window). Scores are scaled by `scale` (default head_dim ** -0.5) and, with
`softcap`, squashed to `softcap * tanh(scores / softcap)` before the mask (Gemma 2). Implementations:

- `reference`: scores materialised, `[B, heads, T, S]`. Used for decoding (T is a few tokens) and as the oracle.
- `blockwise`: keys in blocks with an online softmax (flash attention in pure JAX) and a custom VJP that saves only
  the output and the log-sum-exp, so neither the forward nor the backward pass holds more than `[T, block]` scores
  per head: memory is linear in T. The portable path (CPU, and GPU wherever cuDNN cannot express the mask).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (the cuDNN flash kernel) on GPU in bf16/fp16,
  for masks it can express: causal rows that are right-padded (`right_padded=True`: one segment per row).
- `splash`: the Pallas splash-attention kernel on TPU (segment ids, causal or local masks).
- `ragged`: decoding over a KV cache, a Pallas kernel that reads each row's keys only up to its last valid slot
  (`decode_attention.py`); `auto`'s pick for cached decoding on TPU. Calls without a cache take `auto`'s path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax.model import decode_attention
from s2d_jax.model.quant import kv_load

MASKED = -0.7 * float(np.finfo(np.float32).max)
IMPLEMENTATIONS = ("auto", "reference", "blockwise", "cudnn", "splash", "ragged")
BLOCK = 512  # keys per block of the blockwise path
# where a kernel named by `model.attention` runs; on a CPU the Pallas kernels run in Pallas' interpreter (tests)
PLATFORMS = {"cudnn": ("gpu",), "splash": ("tpu", "cpu"), "ragged": ("tpu", "cpu")}


class Mask(NamedTuple):
    """Which keys each query sees: same nonzero segment, slot not after the query's, within the window."""

    q_segments: jax.Array  # [B, T] int32
    kv_segments: jax.Array  # [B, S] int32, 0 = padding / empty cache slot
    q_slots: jax.Array  # [B, T] int32
    kv_slots: jax.Array  # [S] int32, or [B, S] where rows hold different slots (a ring per row, continuous batching)


def allowed(mask: Mask, window: int | None, kv_segments=None, kv_slots=None) -> jax.Array:
    """`[B, T, S]` booleans (for the keys given, default all of them)."""
    kv_segments = mask.kv_segments if kv_segments is None else kv_segments
    kv_slots = mask.kv_slots if kv_slots is None else kv_slots
    seen = (mask.q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] != 0)
    delta = mask.q_slots[:, :, None] - (kv_slots[None, None, :] if kv_slots.ndim == 1 else kv_slots[:, None, :])
    seen &= delta >= 0
    if window:
        seen &= delta < window
    return seen


def _platform_name(platform: str | None) -> str | None:
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def unavailable(impl: str, platform: str) -> str | None:
    """Why `impl` cannot run on `platform` (None when it can): for the one line a config gets before any weights
    load."""
    platform = _platform_name(platform)
    if platform in PLATFORMS.get(impl, (platform,)):
        return None
    return f"{impl!r} runs on {', '.join(PLATFORMS[impl])}, not on this run's {platform}; 'auto' picks the fastest path there"


def choose(q_len: int, dtype, right_padded: bool, backend: str | None = None, cached: bool = False,
           softcap: float | None = None) -> str:
    """The implementation `auto` picks for `q_len` queries in `dtype` on `backend` (the platform the program is
    built for; default: JAX's, but a program compiled ahead of time for a TPU from a CPU names "tpu"); `cached`:
    the keys are a KV cache (slots not aligned with the queries), which only the portable paths and the ragged
    decode kernel (TPU) express; cuDNN's kernel has no soft-capping."""
    backend = _platform_name(backend) or jax.default_backend()
    if cached and q_len <= 16 and backend == "tpu":
        return "ragged"
    if q_len <= 16 or cached:
        return "reference"  # decoding: a few queries, scores are [T, S] with T tiny
    if backend == "gpu" and right_padded and not softcap and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if backend == "tpu":
        return "splash"
    return "blockwise"


def resolve(impl: str, q_len: int, dtype, right_padded: bool = False, cached: bool = False,
            softcap: float | None = None, platform: str = "") -> str:
    """The implementation that runs: `impl`, or what `auto` picks where `impl` cannot take these inputs."""
    if (impl == "auto" or cached and impl in ("cudnn", "splash") or softcap and impl == "cudnn"
            or impl == "ragged" and not cached):
        return choose(q_len, dtype, right_padded, platform or jax.default_backend(), cached=cached, softcap=softcap)
    return impl


def attention(q, k, v, mask: Mask, *, window: int | None = None, impl: str = "auto", right_padded: bool = False,
              cached: bool = False, block: int = BLOCK, scale: float | None = None,
              softcap: float | None = None, platform: str = "", splash_block: int = 0) -> jax.Array:
    """`q: [B, K, G, T, hd]` (G query heads per kv head), `k, v: [B, K, S, hd]` (a cache's may be `Int8KV`) ->
    `[B, K, G, T, hd]` in q's dtype. Scores and the softmax are float32. With `cached` keys, a kernel that needs
    aligned slots (cuDNN, splash) gives way to what `auto` picks, as cuDNN does for soft-capping; without, the
    ragged decode kernel does. `platform`: the one the program is built for ("" = JAX's backend here)."""
    platform = platform or jax.default_backend()
    impl = resolve(impl, q.shape[3], q.dtype, right_padded, cached, softcap, platform)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = float(softcap) if softcap else None
    if impl == "ragged":
        return _ragged(q, k, v, mask, window, scale, softcap, platform)
    k, v = kv_load(k, q.dtype), kv_load(v, q.dtype)
    if impl == "reference":
        return reference(q, k, v, mask, window, scale, softcap, keys_first=platform == "cpu")
    if impl == "blockwise":
        return blockwise(q, k, v, mask, window, block, scale, softcap)
    if impl == "cudnn":
        return _cudnn(q, k, v, mask, window, scale)
    if impl == "splash":
        return _splash(q, k, v, mask, window, scale, softcap, platform, splash_block)
    raise ValueError(f"attention implementation {impl!r}: expected one of {', '.join(IMPLEMENTATIONS)}")


def _capped(scores, softcap):
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def _products(q, k, keys_first: bool):
    """`einsum("bkgth,bksh->bkgts", q, k)` in float32. `keys_first` (XLA:CPU): the keys as the product's left
    operand, read in their own layout: as the right operand, contracted on their minor dimension, XLA:CPU repacks
    every key block (in a SmolLM2 decode step at 32 slots the scores took 2.2x the values' product over the same
    bytes; this way 1.8x). The barrier keeps XLA from folding the transpose back into the product, which restores
    the repacking. Not measured on a GPU, so not used there."""
    if not keys_first:
        return jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
    b, kh, g, t, hd = q.shape
    s = jax.lax.dot_general(k, q.reshape(b, kh, g * t, hd), (((3,), (3,)), ((0, 1), (0, 1))),
                            preferred_element_type=jnp.float32)  # [B, K, S, G * T]
    return jnp.swapaxes(jax.lax.optimization_barrier(s), 2, 3).reshape(b, kh, g, t, -1)


def reference(q, k, v, mask: Mask, window=None, scale=None, softcap=None, keys_first: bool = False):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = _products(q, k.astype(q.dtype), keys_first) * scale
    scores = jnp.where(allowed(mask, window)[:, None, None], _capped(scores, softcap), MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bksh->bkgth", probs, v.astype(q.dtype))


# ------------------------------------------------------------------------------------------ blockwise (flash)


def _blocks(k, v, mask: Mask, block: int):
    """Keys, values, their segments and slots as `[num_blocks, ...]` stacks (padding keys are segment 0)."""
    s = k.shape[2]
    nb = -(-s // block)
    pad = nb * block - s
    if pad:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
    seg = jnp.pad(mask.kv_segments, ((0, 0), (0, pad)))
    slots = jnp.pad(mask.kv_slots, (0, pad), constant_values=np.iinfo(np.int32).max)
    split = lambda x, axis: jnp.moveaxis(x.reshape(x.shape[:axis] + (nb, block) + x.shape[axis + 1:]), axis, 0)
    return split(k, 2), split(v, 2), split(seg, 1), split(slots, 0)


def _scores(q, kj, mask, segj, slotj, window, scale, softcap):
    """Masked scores of a key block, and the soft-capped ones before the mask (for the backward pass)."""
    s = _capped(jnp.einsum("bkgth,bksh->bkgts", q, kj.astype(q.dtype), preferred_element_type=jnp.float32) * scale,
                softcap)
    return jnp.where(allowed(mask, window, segj, slotj)[:, None, None], s, MASKED), s


def _flash_forward(q, k, v, mask, window, block, scale, softcap):
    b, kh, g, t, hd = q.shape

    def body(carry, xs):
        m, l, acc = carry
        kj, vj, segj, slotj = xs
        s, _ = _scores(q, kj, mask, segj, slotj, window, scale, softcap)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        pv = jnp.einsum("bkgts,bksh->bkgth", p.astype(q.dtype), vj.astype(q.dtype), preferred_element_type=jnp.float32)
        return (m_new, l, acc * corr[..., None] + pv), None

    init = (jnp.full((b, kh, g, t), MASKED, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
            jnp.zeros((b, kh, g, t, hd), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(body, init, _blocks(k, v, mask, block))
    return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, mask, window, block, scale, softcap):
    return _flash_forward(q, k, v, mask, window, block, scale, softcap)[0]


def _flash_fwd(q, k, v, mask, window, block, scale, softcap):
    out, lse = _flash_forward(q, k, v, mask, window, block, scale, softcap)
    return out, (q, k, v, mask, out, lse)


def _flash_bwd(window, block, scale, softcap, res, dout):
    q, k, v, mask, out, lse = res
    do = dout.astype(jnp.float32)
    delta = jnp.sum(do * out.astype(jnp.float32), axis=-1)  # [B, K, G, T]
    s_len = k.shape[2]

    def body(dq, xs):
        kj, vj, segj, slotj = xs
        s, capped = _scores(q, kj, mask, segj, slotj, window, scale, softcap)
        p = jnp.exp(s - lse[..., None])
        dv = jnp.einsum("bkgts,bkgth->bksh", p, do)
        dp = jnp.einsum("bkgth,bksh->bkgts", do, vj.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        if softcap is not None:  # d/dx cap * tanh(x / cap) = 1 - tanh^2
            ds = ds * (1.0 - jnp.square(capped / softcap))
        dq = dq + jnp.einsum("bkgts,bksh->bkgth", ds, kj.astype(jnp.float32))
        dk = jnp.einsum("bkgts,bkgth->bksh", ds, q.astype(jnp.float32))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), _blocks(k, v, mask, block))
    unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(x.shape[1:3] + (-1, x.shape[-1]))[:, :, :s_len]
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), mask)
    return dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), zeros


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise(q, k, v, mask: Mask, window=None, block: int = BLOCK, scale=None, softcap=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _flash(q, k, v, mask, window, min(block, max(k.shape[2], 1)), scale, softcap)


# ------------------------------------------------------------------------------------------ accelerator kernels


def _cudnn(q, k, v, mask: Mask, window, scale):
    """cuDNN flash attention: causal, right-padded rows (lengths from the segment ids), optional left window."""
    b, kh, g, t, hd = q.shape
    lengths = jnp.sum(mask.q_segments != 0, axis=1).astype(jnp.int32)
    qt = q.reshape(b, kh * g, t, hd).transpose(0, 2, 1, 3)  # [B, T, N, hd], head n = kv head n // G
    kt, vt = (x.astype(q.dtype).transpose(0, 2, 1, 3) for x in (k, v))
    out = jax.nn.dot_product_attention(qt, kt, vt, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, scale=scale,
                                       local_window_size=(window - 1, 0) if window else None, implementation="cudnn")
    return out.transpose(0, 2, 1, 3).reshape(b, kh, g, t, hd)


def splash_blocks(q_len: int, kv_len: int, block: int = 0):
    """The splash kernel's tiles for (padded) lengths: `block` everywhere when given, else for each length the
    largest of 512 / 256 / 128 that divides it. 512 is MaxText's default on v5e, v5p and v6e: large tiles keep
    the MXU busy between the kernel's grid steps; 128 is the smallest the lane dimension takes."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    fit = lambda n: block or next(b for b in (512, 256, 128) if n % b == 0)
    bq, bkv = fit(q_len), fit(kv_len)
    return sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                         block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def _splash(q, k, v, mask: Mask, window, scale, softcap, platform: str, block: int = 0):
    """Pallas splash attention (TPU): one MQA kernel per (row, kv head) over its G query heads; segment ids carry
    padding and packing, the static mask causality and the window. Without a cache only (query i at key slot i);
    lengths are padded to a multiple of 128 (of `block` when set). Off TPU the same kernel runs in Pallas'
    interpreter (tests); for a TPU it lowers through Mosaic, also ahead of time from a CPU (`s2d plan`)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, kh, g, t, hd = q.shape
    s = k.shape[2]
    unit = block or 128
    tp, sp = -(-t // unit) * unit, -(-s // unit) * unit
    if (tp, sp) != (t, s):
        q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    # padding queries (segment 0) see padding keys, at least themselves: no row is empty, so no NaN reaches a
    # padding position's keys and values; real tokens never see segment 0
    qseg = jnp.pad(mask.q_segments, ((0, 0), (0, tp - t)))
    kseg = jnp.pad(mask.kv_segments, ((0, 0), (0, sp - s)))
    shape = (tp, sp)
    one = sm.LocalMask(shape, (window - 1, 0), 0) if window else sm.CausalMask(shape)
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * g), attn_logits_soft_cap=softcap,
                                              block_sizes=splash_blocks(tp, sp, block),
                                              interpret=platform != "tpu")
    scaled = (q * jnp.asarray(scale, q.dtype))

    def one_row(qb, kb, vb, qs, ks):  # qb [K, G, T, hd], kb [K, S, hd]
        ids = sk.SegmentIds(q=qs, kv=ks)
        heads = jax.vmap(lambda qh, kk, vv: kernel(qh, kk, vv, segment_ids=ids))
        return heads(qb, kb.astype(q.dtype), vb.astype(q.dtype))

    run = per_device(jax.vmap(one_row), scaled, k, v, qseg, kseg)
    return run(scaled, k, v, qseg, kseg)[:, :, :, :t]


def _ragged(q, k, v, mask: Mask, window, scale, softcap, platform: str):
    """The ragged decode kernel on each device's rows and kv heads; interpreted off TPU (tests)."""
    mask = mask._replace(kv_slots=jnp.broadcast_to(mask.kv_slots, mask.kv_segments.shape))  # rows, to split
    run = lambda q, k, v, m: decode_attention.ragged(q, k, v, m, window, scale, softcap,
                                                    interpret=platform != "tpu")
    return per_device(run, q, k, v, mask)(q, k, v, mask)


def write_cache(cache, new, index: jax.Array, kernel: bool = False, platform: str = ""):
    """`new` `[B, K, T, hd]` written into a cache layer `[B, K, S, hd]` (or `Int8KV`) from slot `index`: one slot
    for the whole batch (`[]`), or each row's own (`[B]`, continuous batching). `kernel` (the ragged path's): each
    row's slots by the in-place DMA kernel on each device's rows, where the cache is a whole number of its
    windows; else by XLA."""
    slots = jax.tree.leaves(cache)[0].shape[2]
    if kernel and index.ndim == 1 and decode_attention.dma_width(slots, jax.tree.leaves(new)[0].shape[2]):
        run = lambda c, n, i: decode_attention.dma_write(c, n, i, platform)
        return per_device(run, cache, new, index)(cache, new, index)
    return jax.tree.map(lambda c, n: decode_attention.write_slots(c, n, index, 2), cache, new)


def per_device(fn, *args):
    """`fn` over each device's rows and kv heads of `args` (each `[B, K, ...]`, or `[B, ...]` for a row's mask):
    XLA cannot partition a Mosaic kernel. Without a mesh, `fn` itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn
    from s2d_jax.mesh import partition_spec

    heads = ("batch", "kv_heads", None, None, None)
    spec = lambda x: partition_spec(heads[:x.ndim] if x.ndim > 2 else heads[::4][:x.ndim], x.shape, mesh)
    out = jax.tree.map(spec, args[0])  # (an int8 cache layer is a pair)
    return jax.shard_map(fn, mesh=mesh, out_specs=out, check_vma=False,
                         in_specs=tuple(jax.tree.map(spec, a) for a in args))
