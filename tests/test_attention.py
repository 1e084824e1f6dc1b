"""The attention paths against the materialised reference, and memory that grows linearly with the length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2d_jax.model import PRESETS, init_model
from s2d_jax.model import attention as A


def _inputs(seed, b=2, k=2, g=3, t=70, hd=16):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, k, g, t, hd)), jnp.float32)
    kv = [jnp.asarray(rng.normal(size=(b, k, t, hd)), jnp.float32) for _ in range(2)]
    # row 0: left padding then one prompt; row 1: two packed segments then right padding
    seg = np.zeros((b, t), np.int32)
    seg[0, 9:] = 1
    seg[1, :30], seg[1, 30:61] = 1, 2
    slots = jnp.arange(t, dtype=jnp.int32)
    return q, kv[0], kv[1], A.Mask(jnp.asarray(seg), jnp.asarray(seg), jnp.broadcast_to(slots, (b, t)), slots), seg


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("impl,block", [("blockwise", 16), ("blockwise", 512), ("splash", 0), ("reference", 0)])
def test_paths_equal_the_reference_with_gradients(impl, block, window):
    q, k, v, mask, seg = _inputs(seed=block + (window or 0))
    real = (seg != 0)[:, None, None, :, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v), 0.0) ** 2)

    ref = lambda q, k, v: A.reference(q, k, v, mask, window)  # ("reference" on CPU: its keys-first scores)
    got = lambda q, k, v: A.attention(q, k, v, mask, window=window, impl=impl, block=block or A.BLOCK)
    np.testing.assert_allclose(np.where(real, got(q, k, v), 0), np.where(real, ref(q, k, v), 0), atol=2e-6)
    for a, b in zip(jax.grad(loss(got), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_model_logits_do_not_depend_on_the_kernel(impl):
    """Padding, packing and a sliding window through the whole decoder."""
    cfg = PRESETS["tiny"].replace(sliding_window=5)
    model = init_model(cfg, seed=0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 40)), jnp.int32)
    seg = jnp.asarray(np.stack([np.r_[np.zeros(7), np.ones(33)], np.r_[np.ones(20), 2 * np.ones(13), np.zeros(7)]]),
                      jnp.int32)
    logits = {}
    for name in ("reference", impl):
        model.cfg = cfg.replace(attention=name)
        logits[name] = np.asarray(model(tokens, segment_ids=seg))
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(logits[impl][real], logits["reference"][real], atol=1e-5)


def test_auto_picks_by_backend_and_mask():
    assert A.choose(1, jnp.float32, False, "cpu") == "reference"  # decoding
    assert A.choose(512, jnp.float32, True, "cpu") == "blockwise"
    assert A.choose(512, jnp.bfloat16, True, "gpu") == "cudnn"
    assert A.choose(512, jnp.bfloat16, False, "gpu") == "blockwise"  # packed or left-padded: cuDNN cannot say it
    assert A.choose(512, jnp.float32, True, "gpu") == "blockwise"  # cuDNN flash needs 16-bit inputs
    assert A.choose(512, jnp.bfloat16, False, "tpu") == "splash"
    assert A.choose(1, jnp.bfloat16, False, "tpu", cached=True) == "ragged"  # decoding over a cache
    assert A.choose(1, jnp.bfloat16, False, "gpu", cached=True) == "reference"


def _decode_inputs(seed, ring: bool, t: int = 1):
    """Three rows decoding `t` tokens (the last `t` valid slots) over a cache of 384 slots (three key blocks): live
    lengths 6, 201 and 131 with left padding, and one empty row (a free slot of continuous batching); with `ring`,
    each row's slots are its own (a sliding-window ring, `[B, S]` slots)."""
    from s2d_jax.model.transformer import ring_slots

    b, k, g, s, hd = 4, 2, 3, 384, 16
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, k, g, t, hd)), jnp.float32)
    keys, values = (jnp.asarray(rng.normal(size=(b, k, s, hd)), jnp.float32) for _ in range(2))
    index = np.array([5, 200, 130, 0])
    first = np.array([2, 0, 10, 1])
    slot = np.arange(s)
    seg = ((slot[None] <= index[:, None]) & (slot[None] >= first[:, None])).astype(np.int32)
    kv_slots = jnp.arange(s, dtype=jnp.int32)
    if ring:  # the same keys held at ring positions: row r's slot j holds position-slot ring_slots(end)[j]
        kv_slots = jax.vmap(lambda e: ring_slots(e, s))(jnp.asarray(index + 1 + 300 * (index > 100)))
        seg = np.where(np.asarray(kv_slots) >= 0, 1, 0) * (np.arange(b) != 3)[:, None]
    q_slots = (index + 300 * (index > 100) * ring)[:, None] - np.arange(t)[::-1]  # causal among the new tokens
    mask = A.Mask(jnp.ones((b, t), jnp.int32), jnp.asarray(seg, jnp.int32), jnp.asarray(q_slots, jnp.int32),
                  kv_slots)
    return q, keys, values, mask, np.arange(b) != 3


@pytest.mark.parametrize("case", ["float32", "bfloat16", "int8", "softcap", "window", "ring", "three_tokens"])
def test_ragged_decode_equals_the_reference(case):
    """The Pallas decode kernel (interpreted here, Mosaic on a TPU: test_aot) against the materialised path."""
    from s2d_jax.model.decode_attention import live_lengths
    from s2d_jax.model.quant import kv_load, kv_store

    q, k, v, mask, live = _decode_inputs(3, ring=case == "ring", t=3 if case == "three_tokens" else 1)
    assert list(np.asarray(live_lengths(mask.kv_segments))[:3]) == ([6, 384, 384] if case == "ring" else [6, 201, 131])
    window = 50 if case == "window" else None
    softcap = 5.0 if case == "softcap" else None
    if case == "bfloat16":
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    if case == "int8":  # read as int8 with its scales; the reference reads the dequantised values
        k, v = kv_store(k, "int8"), kv_store(v, "int8")
    want = A.reference(q, kv_load(k, q.dtype), kv_load(v, q.dtype), mask, window, None, softcap)
    got = A.attention(q, k, v, mask, window=window, softcap=softcap, impl="ragged", cached=True)
    assert got.dtype == q.dtype
    tol = 2e-2 if case == "bfloat16" else 2e-6
    np.testing.assert_allclose(np.asarray(got[live], np.float32), np.asarray(want[live], np.float32), atol=tol)
    assert np.all(np.asarray(got[~live], np.float32) == 0)  # an empty row reads nothing


def _forward_temp_bytes(t: int, impl: str) -> int:
    cfg = PRESETS["tiny"].replace(max_position_embeddings=4096, attention=impl)
    graphdef, state = nnx.split(init_model(cfg, seed=0))
    fn = jax.jit(lambda s, x: jax.grad(lambda s: nnx.merge(graphdef, s)(x).sum())(s))
    tokens = jax.ShapeDtypeStruct((2, t), jnp.int32)
    return fn.lower(state, tokens).compile().memory_analysis().temp_size_in_bytes


def test_memory_grows_linearly_with_length():
    """Forward + backward at T=2048 vs 1024: the blockwise path about doubles (linear); the reference, which keeps
    [T, T] scores, about quadruples."""
    blockwise = _forward_temp_bytes(2048, "blockwise") / _forward_temp_bytes(1024, "blockwise")
    reference = _forward_temp_bytes(2048, "reference") / _forward_temp_bytes(1024, "reference")
    assert blockwise < 2.5, blockwise
    assert reference > 3.0, reference


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: cuDNN's flash attention runs only there")
def test_cudnn_matches_the_reference_on_gpu():
    """Causal, right-padded rows, a sliding window, GQA, bf16, with gradients (the GPU machine runs this)."""
    q, k, v, _, _ = _inputs(seed=11, t=256, hd=64)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    lengths = np.array([256, 200])
    seg = (np.arange(256)[None] < lengths[:, None]).astype(np.int32)
    slots = jnp.arange(256, dtype=jnp.int32)
    mask = A.Mask(jnp.asarray(seg), jnp.asarray(seg), jnp.broadcast_to(slots, (2, 256)), slots)
    real = (seg != 0)[:, None, None, :, None]
    for window in (None, 32):
        fns = {impl: (lambda q, k, v, impl=impl: A.attention(q, k, v, mask, window=window, impl=impl))
               for impl in ("cudnn", "reference")}
        outs = {impl: np.asarray(f(q, k, v).astype(jnp.float32)) for impl, f in fns.items()}
        np.testing.assert_allclose(np.where(real, outs["cudnn"], 0), np.where(real, outs["reference"], 0), atol=2e-2)
        grads = {impl: jax.grad(lambda q, k, v, f=f: jnp.sum(jnp.where(real, f(q, k, v).astype(jnp.float32), 0)
                                                               ** 2), (0, 1, 2))(q, k, v) for impl, f in fns.items()}
        for a, b in zip(grads["cudnn"], grads["reference"]):
            a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
            assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2


@pytest.mark.parametrize("dtype,t", [("float32", 1), ("bfloat16", 1), ("int8", 3), ("bfloat16", 40)])
def test_the_kernel_cache_write_equals_xlas(dtype, t):
    """Each row's new slots written by the in-place DMA kernel (interpreted here; Mosaic on a TPU: test_aot), through
    an aligned window around them, equal XLA's per-row update: at the cache's first and last slots, across a
    window's edge, and for an int8 cache (`Int8KV`: its scales by XLA)."""
    from s2d_jax.model.attention import write_cache as write
    from s2d_jax.model.decode_attention import ALIGN, dma_width, write_slots
    from s2d_jax.model.quant import kv_store

    b, k, slots, hd = 5, 2, 128, 16
    rng = np.random.default_rng(0)
    cache, new = (jnp.asarray(rng.normal(size=(b, k, n, hd)) * 20, jnp.float32) for n in (slots, t))
    index = jnp.asarray([0, slots - t, ALIGN - 1, 2 * ALIGN + 5, 77 % (slots - t + 1)], jnp.int32)
    if dtype == "int8":
        cache, new = kv_store(cache, "int8"), kv_store(new, "int8")
    else:
        cache, new = cache.astype(dtype), new.astype(dtype)
    assert dma_width(slots, t) is not None and dma_width(slots + 1, t) is None  # else XLA writes
    got = jax.jit(lambda c, n, i: write(c, n, i, kernel=True))(cache, new, index)
    want = jax.tree.map(lambda c, n: write_slots(c, n, index, 2), cache, new)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
