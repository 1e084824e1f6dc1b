"""Cross-entropy through the output projection without `[B, T, vocab]` logits.

The positions are taken `chunk` at a time: each chunk's float32 logits `[B, chunk, vocab]` are computed, reduced
to the loss, and their gradients with respect to the hidden states and the head are computed on the spot (a
custom VJP, as Liger's fused linear cross-entropy does), so neither pass ever holds more than one chunk's logits
and nothing is recomputed: the head's matmuls cost what they cost unchunked (one forward, two backward).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax.sampling.select import argmax


def cross_entropy(hidden, head, targets, weights, chunk: int = 0, softcap: float | None = None):
    """`(sum of weighted -log p(target), sum of weighted correct argmax)` for `hidden: [B, T, D]`,
    `head: [V, D]`, `targets: [B, T]` int, `weights: [B, T]`. `chunk` positions at a time (0 = all at once);
    `softcap`: logits are `softcap * tanh(logits / softcap)` (Gemma 2's final soft-capping)."""
    t = hidden.shape[1]
    if not chunk or chunk >= t:
        logits = jnp.einsum("btd,vd->btv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
        if softcap:
            logits = softcap * jnp.tanh(logits / softcap)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        correct = (argmax(logits) == targets) * weights
        return jnp.sum(nll * weights), jax.lax.stop_gradient(jnp.sum(correct))
    return _chunked(hidden, head, targets, weights, chunk, float(softcap) if softcap else None)


def _split(x, chunk):
    """`[B, T, ...]` -> `[T / chunk, B, chunk, ...]`, padding T (padded positions get weight 0)."""
    pad = -x.shape[1] % chunk
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)


def _forward(hidden, head, targets, weights, chunk, softcap):
    dt = hidden.dtype
    w_head = head.astype(dt)

    def body(carry, xs):
        loss, correct, dhead = carry
        h, y, w = xs
        logits = jnp.einsum("bcd,vd->bcv", h, w_head, preferred_element_type=jnp.float32)
        if softcap:
            squashed = jnp.tanh(logits / softcap)
            logits = softcap * squashed
        top = jnp.max(logits, -1, keepdims=True)
        e = jnp.exp(logits - top)  # one pass of exponentials serves the loss and its gradient
        total = jnp.sum(e, -1, keepdims=True)
        nll = (jnp.log(total) + top - jnp.take_along_axis(logits, y[..., None], -1))[..., 0]
        dlogits = (e / total - jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.float32)) * w[..., None]
        if softcap:
            dlogits = dlogits * (1.0 - jnp.square(squashed))
        dh = jnp.einsum("bcv,vd->bcd", dlogits.astype(dt), w_head, preferred_element_type=jnp.float32)
        dhead = dhead + jnp.einsum("bcv,bcd->vd", dlogits.astype(dt), h, preferred_element_type=jnp.float32)
        correct = correct + jnp.sum((argmax(logits, top) == y) * w)
        return (loss + jnp.sum(nll * w), correct, dhead), (dh.astype(dt), nll)

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jnp.zeros(head.shape, jnp.float32))
    xs = (_split(hidden, chunk), _split(targets, chunk), _split(weights.astype(jnp.float32), chunk))
    (loss, correct, dhead), (dh, nll) = jax.lax.scan(body, init, xs)
    unsplit = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :hidden.shape[1]]
    return loss, correct, unsplit(dh), dhead, unsplit(nll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked(hidden, head, targets, weights, chunk, softcap):
    loss, correct, *_ = _forward(hidden, head, targets, weights, chunk, softcap)
    return loss, correct


def _chunked_fwd(hidden, head, targets, weights, chunk, softcap):
    loss, correct, dh, dhead, nll = _forward(hidden, head, targets, weights, chunk, softcap)
    return (loss, correct), (dh, dhead.astype(head.dtype), nll.astype(weights.dtype), targets)


def _chunked_bwd(chunk, softcap, res, cotangents):
    dh, dhead, nll, targets = res
    g = cotangents[0]  # the correct-count output has no gradient
    return ((g * dh).astype(dh.dtype), (g * dhead).astype(dhead.dtype), np.zeros(targets.shape, jax.dtypes.float0),
            (g * nll).astype(nll.dtype))


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
