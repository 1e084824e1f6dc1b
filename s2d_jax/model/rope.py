"""Rotary position embeddings as transformers computes them: plain, linear, Llama 3 and LongRoPE (Phi-3) scaling,
Gemma 3's local theta, partial rotary; cos/sin tables once per forward, applied with the rotate-half convention."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax.model.config import ModelConfig


def inverse_frequencies(dim: int, theta: float, scaling: tuple | None = None) -> np.ndarray:
    """Inverse frequencies `[dim // 2]`, with Llama 3 / linear scaling as transformers computes them."""
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if scaling and scaling[0] == "linear":
        inv = inv / scaling[1]
    elif scaling and scaling[0] == "llama3":
        _, factor, low, high, original = scaling
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = original / low, original / high
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """The global layers' inverse frequencies `[rotary_dim // 2]` (LongRoPE: its short factors)."""
    inv = inverse_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
    if cfg.rope_scaling and cfg.rope_scaling[0] == "longrope":
        inv = inv / np.asarray(cfg.rope_scaling[1])
    return inv.astype(np.float32)


def rope_tables(positions: jax.Array, cfg: ModelConfig, dtype, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[batch, len, rotary_dim]` for `positions: [batch, len]`: once per forward and layer kind.
    `local`: Gemma 3's sliding layers (plain RoPE at `local_rope_theta`). LongRoPE takes the long factors for a
    row whose furthest position is past the original context, as transformers does per forward (per row here,
    so that a row's result never depends on its neighbours), and scales cos and sin by its attention factor.
    Decoding past that point keeps the keys already cached, as transformers' forward with a cache does (its
    `generate` instead re-prefills a Phi-3 row once, when the row first crosses the original context)."""
    pos = positions[..., None].astype(jnp.float32)
    scaling, factor = cfg.rope_scaling, 1.0
    if local and cfg.local_rope_theta is not None:
        angles = pos * inverse_frequencies(cfg.rotary_dim, cfg.local_rope_theta).astype(np.float32)
    elif scaling and scaling[0] == "longrope":
        _, short, long, original, factor = scaling
        base = inverse_frequencies(cfg.rotary_dim, cfg.rope_theta)
        use_long = (jnp.max(positions, axis=-1) + 1 > original)[:, None, None]
        angles = pos * jnp.where(use_long, (base / np.asarray(long)).astype(np.float32),
                                 (base / np.asarray(short)).astype(np.float32))
    else:
        angles = pos * rope_frequencies(cfg)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return (jnp.cos(angles) * factor).astype(dtype), (jnp.sin(angles) * factor).astype(dtype)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate `x: [batch, heads..., len, head_dim]` (rotate-half convention, as transformers); with partial
    rotary, only the first `rotary_dim` dimensions turn."""
    cos, sin = rope
    dim = cos.shape[-1]
    if dim < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :dim], rope), x[..., dim:]], axis=-1)
    shape = cos.shape[:1] + (1,) * (x.ndim - cos.ndim) + cos.shape[1:]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos.reshape(shape) + rotated * sin.reshape(shape)
