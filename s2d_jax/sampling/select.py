"""How the next token is chosen from logits: tiny frozen classes with one method, so jit sees them as static."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def argmax(x: jax.Array, top: jax.Array | None = None) -> jax.Array:
    """`jnp.argmax(x, -1)` (the first index of the largest; of the first NaN if any) as two reductions: XLA:CPU runs
    argmax's paired (value, index) reduction at about 1 GB/s, 17x slower than these (3.5 ms of a SmolLM2 decode step
    at 32 slots, 2 cores). `top`: `x`'s max over the last axis, where the caller has it."""
    top = jnp.max(x, -1, keepdims=True) if top is None else top
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where((x == top) | jnp.isnan(x), index, x.shape[-1] - 1), -1)


@dataclasses.dataclass(frozen=True)
class Greedy:
    def select(self, logits: jax.Array, keys: jax.Array) -> jax.Array:
        return argmax(logits)


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


MAX_BLOCKS = 1024  # blocks of the two-level draw, at most
MAX_WIDTH = 2048  # tokens per block, at most; past it the vocabulary is padded to blocks of PADDED_WIDTH
PADDED_WIDTH = 128


def blocks(vocab: int) -> tuple[int, int]:
    """(blocks, tokens per block) of the two-level draw: as many blocks as the largest power of two dividing the
    vocabulary (at most MAX_BLOCKS), so that a vocabulary sharded over a power-of-two number of devices holds whole
    blocks on each (Llama 3's 128,256 tokens: 256 blocks of 501; blocks of 128 split them, 125.25 to each of 8
    devices, and XLA gathered every row's probabilities); blocks of PADDED_WIDTH over a padded vocabulary where that
    would leave blocks wider than MAX_WIDTH (an odd vocabulary, which no mesh shards evenly anyway)."""
    n = min(vocab & -vocab, MAX_BLOCKS)
    if vocab // n <= MAX_WIDTH:
        return n, vocab // n
    return -(-vocab // PADDED_WIDTH), PADDED_WIDTH


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits) by inverting its CDF with one uniform per row: exact (to float32
    sums), and one random number per row where `jax.random.categorical` draws one per vocabulary entry (Gumbel),
    which cost a quarter of a sampled decode step on CPU. A token of probability 0 is never drawn.

    In two levels (`blocks`): the block the draw falls in (a cumulative sum over the blocks' masses), then the token
    within it. One cumulative sum over the whole vocabulary is the same draw (to float32 rounding), but XLA:TPU
    computes it in passes that each write a `[rows, vocab]` float32 array (by XLA's HLO, a tenth of a 1B model's
    decode step at 64 slots); here every pass over the vocabulary is a reduction, and logits sharded over the
    vocabulary stay so."""
    rows, vocab = logits.shape
    n, width = blocks(vocab)
    logits = logits.astype(jnp.float32)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # unnormalised: `u` scales to their sum
    grouped = jnp.pad(weights, ((0, 0), (0, n * width - vocab))).reshape(rows, n, width)
    mass = grouped.sum(axis=-1)  # [rows, blocks]
    upto = jnp.cumsum(mass, axis=-1)
    total = upto[:, -1:]
    u = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)[:, None] * total
    u = jnp.minimum(u, total * (1 - 1e-6))  # strictly below the total, so the draw lands on a token that has mass
    block = _first_above(upto, u, mass > 0)
    chosen = jnp.arange(n)[None, :] == block[:, None]
    inner = jnp.sum(jnp.where(chosen[:, :, None], grouped, 0.0), axis=1)  # [rows, width], a reduction (no gather)
    before = jnp.sum(jnp.where(chosen, upto - mass, 0.0), axis=1, keepdims=True)
    return jnp.minimum(block * width + _first_above(before + jnp.cumsum(inner, axis=-1), u, inner > 0), vocab - 1)


def _first_above(cdf: jax.Array, u: jax.Array, has_mass: jax.Array) -> jax.Array:
    """Per row, the first index whose cumulative value exceeds `u`, never past the last one with mass (float32
    rounding can leave the whole row at or below `u`)."""
    index = jnp.arange(cdf.shape[-1])[None, :]
    last = jnp.max(jnp.where(has_mass, index, 0), axis=-1)
    return jnp.minimum(jnp.sum(cdf <= u, axis=-1), last)


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
