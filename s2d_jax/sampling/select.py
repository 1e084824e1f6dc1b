"""How the next token is chosen from logits: tiny frozen classes with one method, so jit sees them as static."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Greedy:
    def select(self, logits: jax.Array, keys: jax.Array) -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Temperature sampling, optionally restricted to the top-k tokens and/or the top-p nucleus (k first)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def select(self, logits: jax.Array, keys: jax.Array) -> jax.Array:
        logits = logits.astype(jnp.float32) / self.temperature
        if self.top_k is not None:
            logits, index = jax.lax.top_k(logits, self.top_k)  # sorted, descending
        else:
            index = None
        if self.top_p is not None:
            if index is None:
                order = jnp.argsort(-logits, axis=-1)
                logits, index = jnp.take_along_axis(logits, order, -1), order
            probs = jax.nn.softmax(logits, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
            logits = jnp.where(before < self.top_p, logits, -jnp.inf)  # the best token is always kept
        choice = categorical(keys, logits)
        if index is not None:
            choice = jnp.take_along_axis(index, choice[:, None], -1)[:, 0]
        return choice.astype(jnp.int32)


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits) by inverting its CDF with one uniform per row: exact (to float32
    sums), and one random number per row where `jax.random.categorical` draws one per vocabulary entry (Gumbel),
    which cost a quarter of a sampled decode step on CPU. A token of probability 0 is never drawn."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    total = cdf[:, -1:]
    u = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)[:, None] * total
    u = jnp.minimum(u, total * (1 - 1e-6))  # strictly below the total, so the draw lands on a token that has mass
    return jnp.minimum(jnp.sum(cdf <= u, axis=-1), logits.shape[-1] - 1)


def make_method(temperature: float, top_k: int | None, top_p: float | None):
    from s2d_jax.errors import S2DError

    if temperature < 0:
        raise S2DError(f"temperature={temperature}: expected >= 0")
    if top_k is not None and top_k < 1:
        raise S2DError(f"top_k={top_k}: expected a positive integer or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise S2DError(f"top_p={top_p}: expected 0 < top_p <= 1 or None")
    if temperature == 0 or top_k == 1:
        return Greedy()
    return Sampling(float(temperature), top_k, top_p)
