"""Decode attention that reads only live KV: a Pallas kernel over the sampler's contiguous cache.

Decoding attends a few new tokens per row to a cache `[B, K, S, hd]` whose width S is the widest row's bucket
(`sampling/cache.py`); under continuous batching most rows hold far fewer tokens. XLA's path reads all S slots of
every row. This kernel walks each (row, kv head) over key blocks and stops at the row's last valid slot: a block
past it maps to the same block index as the last live one, so the pipeline issues no copy for it, and its compute
is skipped (`pl.when`). The live length per row comes in as a prefetched scalar (MaxText's ragged attention and
JAX's paged attention use the same trick). An int8 cache (`quant.Int8KV`) is read as int8: the key scales
multiply the scores and the value scales the probabilities, each one per slot.

The new tokens' keys and values reach the cache through `dma_write` (`attention.write_cache` maps it over the
mesh): per row at its own slot, XLA's scatter moves the
whole cache layer through VMEM and back every step (by XLA:TPU's own HLO, a third more HBM traffic per layer than
the weights and the live KV at 64 slots); on TPU a kernel DMAs each row's new slots into the cache in place.

Queries of one kv head (its G query heads x T new tokens) are the rows of one `[G T, block]` score tile, float32,
with an online softmax across blocks. The mask is the one every path takes (`attention.Mask`) over a cache: a key
is seen when its slot is valid (segment nonzero; a cache's new tokens are all one segment) and not after the
query's (and within the window). On TPU it lowers through
Mosaic (also ahead of time from a CPU, `s2d plan`); elsewhere it runs in Pallas' interpreter (the tests' parity
check against the XLA path). No GPU lowering: on a GPU `auto` keeps XLA's path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from s2d_jax.model.quant import Int8KV

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
BLOCKS = (512, 256, 128)  # key slots per grid step: the largest dividing the cache width (else the whole width)


def block_size(slots: int) -> int:
    return next((b for b in BLOCKS if slots % b == 0), slots)


def live_lengths(kv_segments: jax.Array) -> jax.Array:
    """`[B]`: one past each row's last valid cache slot (0 for an empty row): the slots the kernel reads."""
    slots = jnp.arange(1, kv_segments.shape[1] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(kv_segments != 0, slots, 0), axis=1).astype(jnp.int32)


def _kernel(live, q_ref, k_ref, v_ref, *refs, block, blocks, scale, softcap, window, int8):
    if int8:
        ks_ref, vs_ref, seg_ref, kvslot_ref, qslot_ref, o_ref, m_sc, l_sc, acc_sc = refs
    else:
        seg_ref, kvslot_ref, qslot_ref, o_ref, m_sc, l_sc, acc_sc = refs
    b, j = pl.program_id(0), pl.program_id(2)

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, MASKED, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j * block < live[b])
    def _():
        q = q_ref[0, 0]  # [R, hd], R = G T
        k = k_ref[0, 0].astype(q.dtype)  # [block, hd]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if int8:
            s = s * ks_ref[0, 0]  # [1, block]: each key's scale
        s = s * scale
        if softcap:
            s = softcap * jnp.tanh(s / softcap)
        delta = qslot_ref[0] - kvslot_ref[0]  # [R, 1] - [1, block]
        ok = (seg_ref[0] != 0) & (delta >= 0)
        if window:
            ok &= delta < window
        s = jnp.where(ok, s, MASKED)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.where(ok, jnp.exp(s - m_new), 0.0)
        corr = jnp.exp(m_prev - m_new)
        l_sc[...] = l_sc[...] * corr + p.sum(axis=1, keepdims=True)
        if int8:
            p = p * vs_ref[0, 0]  # each value's scale
        pv = jax.lax.dot_general(p.astype(q.dtype), v_ref[0, 0].astype(q.dtype), (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * corr + pv
        m_sc[...] = m_new

    @pl.when(j == blocks - 1)
    def _():
        l = l_sc[...]
        o_ref[0, 0] = jnp.where(l > 0, acc_sc[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def ragged(q, k, v, mask, window=None, scale=None, softcap=None, interpret: bool = True) -> jax.Array:
    """`q: [B, K, G, T, hd]`, `k, v: [B, K, S, hd]` (arrays in any float dtype, or `Int8KV`) -> `[B, K, G, T, hd]`
    in q's dtype; `mask` an `attention.Mask` over the cache. One device's rows and kv heads (the caller maps it
    over the mesh)."""
    b, kh, g, t, hd = q.shape
    int8 = isinstance(k, Int8KV)
    s = k.shape[2]
    block = block_size(s)
    blocks = s // block
    scale = hd ** -0.5 if scale is None else float(scale)
    rows = g * t
    qr = q.reshape(b, kh, rows, hd)
    seg = mask.kv_segments.astype(jnp.int32).reshape(b, 1, s)
    kv_slots = jnp.broadcast_to(mask.kv_slots, (b, s)).astype(jnp.int32).reshape(b, 1, s)
    q_slots = jnp.broadcast_to(mask.q_slots[:, None, :], (b, g, t)).reshape(b, rows, 1).astype(jnp.int32)
    live = live_lengths(mask.kv_segments)

    last = lambda bi, j, live_ref: jnp.minimum(j, jnp.maximum(live_ref[bi] - 1, 0) // block)  # no copy past live
    kv_spec = pl.BlockSpec((1, 1, block, hd), lambda bi, h, j, lv: (bi, h, last(bi, j, lv), 0))
    scale_spec = pl.BlockSpec((1, 1, 1, block), lambda bi, h, j, lv: (bi, h, 0, last(bi, j, lv)))
    row_spec = pl.BlockSpec((1, 1, block), lambda bi, h, j, lv: (bi, 0, last(bi, j, lv)))
    q_spec = pl.BlockSpec((1, 1, rows, hd), lambda bi, h, j, lv: (bi, h, 0, 0))
    inputs, specs = [qr, in_hbm(k.q if int8 else k), in_hbm(v.q if int8 else v)], [q_spec, kv_spec, kv_spec]
    if int8:
        inputs += [k.scale.reshape(b, kh, 1, s), v.scale.reshape(b, kh, 1, s)]
        specs += [scale_spec, scale_spec]
    inputs += [seg, kv_slots, q_slots]
    specs += [row_spec, row_spec, pl.BlockSpec((1, rows, 1), lambda bi, h, j, lv: (bi, 0, 0))]
    kv_bytes = sum(x.size * x.dtype.itemsize for x in inputs[1:3] + (inputs[3:5] if int8 else []))
    out = pl.pallas_call(
        functools.partial(_kernel, block=block, blocks=blocks, scale=scale, softcap=softcap and float(softcap),
                          window=window, int8=int8),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, kh, blocks), in_specs=specs, out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                            pltpu.VMEM((rows, hd), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qr.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=4 * b * kh * rows * s * hd, transcendentals=b * kh * rows * s,
                                      bytes_accessed=kv_bytes + 2 * qr.size * qr.dtype.itemsize),
        interpret=interpret,
        name="ragged_decode_attention",
    )(live, *inputs)
    return out.reshape(b, kh, g, t, hd)


def dma_write(cache, new, index: jax.Array, platform: str = ""):
    """`new` `[B, K, T, hd]` written into a cache layer `[B, K, S, hd]` (or `Int8KV`) at each row's slot `index`
    `[B]` by the in-place kernel (interpreted off TPU); an int8 cache's scales by XLA. One device's rows."""
    run = lambda c, n: _dma_write(c, n, index, interpret=(platform or jax.default_backend()) != "tpu")
    if isinstance(cache, Int8KV):
        return Int8KV(run(cache.q, new.q), write_slots(cache.scale, new.scale, index, 2, select=True))
    return run(cache, new)


def write_slots(cache: jax.Array, new: jax.Array, index: jax.Array, axis: int, select: bool = False) -> jax.Array:
    """`new` written into `cache` along `axis` from slot `index` (`[]` or `[B]`), by XLA. `select`: each row's
    slots by one elementwise select over the whole array (a start clamped as `dynamic_update_slice` clamps it), for
    small arrays (the valid mask, an int8 cache's scales): XLA:TPU runs a per-row scatter as a loop over the rows,
    one iteration after another, each copying the whole array (64 of them in each step of an 8B decode at 64 slots)."""
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(cache, new, tuple(index if a == axis else 0 for a in range(cache.ndim)))
    if select:
        t, size = new.shape[axis], cache.shape[axis]
        start = jnp.clip(index, 0, size - t).reshape((-1,) + (1,) * (cache.ndim - 1))
        offset = jnp.arange(size).reshape([-1 if a == axis else 1 for a in range(cache.ndim)]) - start
        if t > 1:
            new = jnp.take_along_axis(new, jnp.broadcast_to(jnp.clip(offset, 0, t - 1), cache.shape), axis)
        return jnp.where((offset >= 0) & (offset < t), new.astype(cache.dtype), cache)
    row = lambda c, x, i: jax.lax.dynamic_update_slice(c, x, tuple(i if a == axis - 1 else 0 for a in range(c.ndim)))
    return jax.vmap(row)(cache, new, index)


ALIGN = 32  # cache slots a DMA window starts and ends on: a tile's rows for float32, bfloat16 and int8 alike


def _write_kernel(index_ref, new_ref, _, cache_ref, window_ref, sem, *, t, width, slots):
    """Row b: the aligned window of slots holding index[b]..index[b] + t - 1 copied in, those slots replaced, copied
    back (a DMA's offset along a tiled dimension must be a whole tile)."""
    b = pl.program_id(0)
    i = index_ref[b]
    start = pl.multiple_of(jnp.minimum(i // ALIGN * ALIGN, slots - width), ALIGN)
    region = cache_ref.at[b, :, pl.ds(start, width), :]
    copy = pltpu.make_async_copy(region, window_ref, sem)
    copy.start()
    copy.wait()
    buf = window_ref[...]
    at = jax.lax.broadcasted_iota(jnp.int32, buf.shape, 1) + start
    for n in range(t):
        buf = jnp.where(at == i + n, new_ref[0, :, n:n + 1, :].astype(buf.dtype), buf)
    window_ref[...] = buf
    copy = pltpu.make_async_copy(window_ref, region, sem)
    copy.start()
    copy.wait()


def dma_width(slots: int, t: int) -> int | None:
    """The DMA window for `t` new slots in a cache of `slots` (None: the cache is not a whole number of windows,
    and XLA writes it)."""
    width = -(-(t + ALIGN - 1) // ALIGN) * ALIGN if t > 1 else ALIGN
    return width if slots % ALIGN == 0 and width <= slots else None


def _dma_write(cache: jax.Array, new: jax.Array, index: jax.Array, interpret: bool) -> jax.Array:
    """One device's rows: row b's `new[b]` written to `cache[b, :, index[b]:index[b] + T]` through a small aligned
    window, the cache aliased to the output (it stays in HBM, touched only around the new slots)."""
    b, k, slots, hd = cache.shape
    t = new.shape[2]
    width = dma_width(slots, t)
    return pl.pallas_call(
        functools.partial(_write_kernel, t=t, width=width, slots=slots),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b,),
            in_specs=[pl.BlockSpec((1, k, t, hd), lambda r, i: (r, 0, 0, 0)), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec(memory_space=pl.ANY),
            scratch_shapes=[pltpu.VMEM((k, width, hd), cache.dtype), pltpu.SemaphoreType.DMA]),
        out_shape=jax.ShapeDtypeStruct(cache.shape, cache.dtype),
        input_output_aliases={2: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        cost_estimate=pl.CostEstimate(flops=0, transcendentals=0,
                                      bytes_accessed=(2 * b * k * width * hd + new.size) * cache.dtype.itemsize),
        interpret=interpret,
        name="kv_cache_write",
    )(index.astype(jnp.int32), new.astype(cache.dtype), in_hbm(cache))


def in_hbm(x: jax.Array) -> jax.Array:
    """`x` kept in HBM for a kernel: XLA would otherwise stage a cache that fits into VMEM whole, reading every
    slot (and writing it all back if the kernel wrote any), which is what these kernels exist to avoid."""
    return pltpu.with_memory_space_constraint(x, pltpu.HBM)
