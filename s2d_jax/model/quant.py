"""int8 weights for generation (`generate.weights_dtype=int8`): decoding reads every weight every step, so halving
the bytes of a bf16 model's projections nearly halves a memory-bound step.

Symmetric, per output channel: each projection's values become `round(w / scale)` in int8 with `scale =
max|w| / 127` over the dimensions a product contracts, kept beside it as a `Scale` (float32, the weight's shape
with the contracted dimensions 1, laid out by the same logical axes). The decoder reads a weight through `weight()`
(int8 converted to the compute dtype, which XLA fuses into the product's operand, so the product reads int8) and
scales the product's output channels with `scaled()`: the same as multiplying by `q * scale`, with the scaling on
the small output instead of on every weight element.
Quantised: q/k/v, o, gate/up, down and an untied output head; embeddings, norms and biases stay as they are.

The KV cache in int8 (`generate.cache_dtype=int8`): each cached key and value vector as int8 with its own scale
(`Int8KV`), quantised where the cache is written and dequantised where attention reads it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

WEIGHTS_DTYPES = ("", "int8")
# parameter name -> the axes its product contracts (of the unstacked weight)
CONTRACTED = {"qkv": (0,), "o": (0, 1, 2), "gate_up": (1,), "down": (0,), "lm_head": (1,)}


class Scale(nnx.Variable):
    """Per-output-channel scales of an int8 weight (not trained, not exported)."""


def weight(owner, name: str, dtype) -> jax.Array:
    """`owner.name` in `dtype` (an int8 weight unscaled: `scaled()` applies its scales to the product)."""
    return getattr(owner, name)[...].astype(dtype)


def scaled(out: jax.Array, owner, name: str, index=None) -> jax.Array:
    """The product `out` of `weight(owner, name)` (or of its `index`-th part) with the weight's per-output-channel
    scales applied, when it was quantised. The output channels are `out`'s last dimensions, in the weight's order:
    the scale with its contracted (size-1) dimensions dropped broadcasts against them."""
    scale = getattr(owner, name + "_scale", None)
    if scale is None:
        return out
    s = scale[...] if index is None else scale[...][index]
    return out * jnp.squeeze(s).astype(out.dtype)


def dequantized(owner, name: str, dtype) -> jax.Array:
    """`owner.name` as a `dtype` array of its values (`q * scale` when quantised)."""
    scale = getattr(owner, name + "_scale", None)
    w = weight(owner, name, dtype)
    return w if scale is None else w * scale[...].astype(dtype)


def quantize(model, dtype: str = "int8"):
    """A copy of `model` with its projections in int8 and their scales (`model` is untouched); "" = `model`."""
    if not dtype:
        return model
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)  # a fresh copy of the same arrays
    stacked = int(out.cfg.scan_layers)  # scanned layers: a leading `layers` axis
    owners = [(out, "lm_head", 0)] if out.lm_head is not None else []
    for block in ([out.layers] if stacked else list(out.layers)):
        owners += [(block.attn, "qkv", stacked), (block.attn, "o", stacked), (block.mlp, "gate_up", stacked),
                   (block.mlp, "down", stacked)]
    for owner, name, lead in owners:
        param = getattr(owner, name)
        axes = tuple(a + lead for a in CONTRACTED[name])
        q, scale = _quantize(param[...], axes)
        logical = list(param.get_metadata().get("axes") or (None,) * param.ndim)
        setattr(owner, name, nnx.Param(q, axes=tuple(logical)))
        setattr(owner, name + "_scale", Scale(scale, axes=tuple(None if i in axes else a for i, a in enumerate(logical))))
    return out


@functools.partial(jax.jit, static_argnums=1)
def _quantize(w: jax.Array, axes: tuple[int, ...]):
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale


# ------------------------------------------------------------------------------------------ the KV cache

KV_INT8 = "int8"


class Int8KV(NamedTuple):
    """One layer's int8 keys (or values) `[B, K, S, hd]` and a float32 scale per row, kv head and slot `[B, K, S]`
    (symmetric over `hd`: one outlier token costs only its own precision). Every slot-axis operation of the cache
    (pad, cut, gather rows, write a slot, shard) applies to both alike: `jax.tree.map`."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def dtype(self):
        return self.q.dtype


def kv_store(x: jax.Array, dtype) -> jax.Array | Int8KV:
    """Keys or values `[B, K, T, hd]` as the cache holds them: cast to `dtype`, or int8 with per-vector scales."""
    if jnp.dtype(dtype) != jnp.int8:
        return x.astype(dtype)
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return Int8KV(jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8), scale)


def kv_load(c, dtype) -> jax.Array:
    """The cache's keys or values in `dtype` (int8 ones dequantised)."""
    if isinstance(c, Int8KV):
        return c.q.astype(dtype) * c.scale[..., None].astype(dtype)
    return c.astype(dtype)
