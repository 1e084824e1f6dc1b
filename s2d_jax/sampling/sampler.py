"""Batched sampling on device: one jitted prefill per padded prompt batch, then a `lax.while_loop` decode.

- Prompts are left-padded to a length bucket, and batches to a size bucket, so compiles are bounded; explicit
  positions and a validity mask make a row's tokens independent of its padding and of its batch.
- `n` samples per prompt share one prefill: the prompt's cache rows are repeated n times afterwards.
- Each (prompt, sample) gets its key from (seed, prompt index, sample index), and each step folds in the step:
  results do not depend on batch composition or device count.
- The KV cache is preallocated per batch in the compute dtype (a sliding layer's as a ring of its window's
  slots), donated between decode chunks, and laid out by the logical rules (batch rows over the data axes, kv
  heads over `tensor`).
- Stop strings are checked on host between chunks of decode steps, never per token. The cache holds only the slots
  that can hold tokens yet (the prompt bucket plus the steps so far, grown by LIVE_BUCKET between decode calls), so
  a step's attention reads no empty slots; log-probabilities are computed only when asked for.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from s2d_jax import distributed, mesh as mesh_lib
from s2d_jax.distributed import fetch
from s2d_jax.errors import S2DError
from s2d_jax.model.transformer import KVCache, Transformer, cache_slots
from s2d_jax.sampling.select import make_method
from s2d_jax.tokenizer import chat_prompt

CACHE_AXES = ("batch", "kv_heads", None, None)
STOP_CHUNK = 16  # decode steps between host checks of stop strings
LIVE_BUCKET = 128  # the cache holds prompt + k * LIVE_BUCKET slots, k stepped up between decode calls


@dataclasses.dataclass
class Sample:
    text: str
    token_ids: list[int]
    num_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    logprobs: list[float] | None = None
    prompt_tokens: int = 0  # tokens of the prompt as the model read it (chat template included)


class Loop(NamedTuple):
    """The decode loop's state: everything lives on device between steps."""

    step: jax.Array  # [] next step to sample
    done: jax.Array  # [B] bool
    logits: jax.Array  # [B, V] logits for the token of `step`
    positions: jax.Array  # [B] position of the token of `step`
    tokens: jax.Array  # [B, max_new] int32
    logprobs: jax.Array  # [B, max_new] float32
    keys: jax.Array  # [B] per-sample PRNG keys
    cache: KVCache


def _bucket(x: int, smallest: int) -> int:
    return max(smallest, 1 << math.ceil(math.log2(max(x, 1))))


@functools.partial(jax.jit, static_argnames=("graphdef", "n", "max_len"))
def _prefill(graphdef, state, tokens, positions, segments, n: int, max_len: int):
    """Prefill `[B, P]` prompts once; return next-token logits and a cache of `B * n` rows and `max_len` slots."""
    Sampler.traces += 1
    model = nnx.merge(graphdef, state)
    hidden, kvs = model.forward(tokens, positions, segment_ids=segments)
    logits = model.logits(hidden[:, -1])  # left padding: every prompt ends at the last column
    repeat = lambda x: jnp.repeat(x, n, axis=0)
    cache = KVCache.from_prefill(model.cfg, [(repeat(k), repeat(v)) for k, v in kvs], repeat(segments != 0), max_len,
                                 jnp.dtype(model.cfg.dtype), lambda x: mesh_lib.constrain(x, CACHE_AXES))
    return jnp.repeat(logits, n, axis=0), cache


@functools.partial(jax.jit, static_argnames=("sizes",), donate_argnames=("loop",))
def _grow(loop: Loop, sizes: tuple[int, ...]) -> Loop:
    """The loop with its cache grown to `sizes[0]` slots (each layer to its own size: a sliding layer's stops at
    its window, and up to then its ring is laid out as a plain cache)."""
    c = loop.cache
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, 0), (0, n - x.shape[2]), (0, 0)))
    cache = KVCache(tuple(mesh_lib.constrain(pad(k, n), CACHE_AXES) for k, n in zip(c.k, sizes[1:])),
                    tuple(mesh_lib.constrain(pad(v, n), CACHE_AXES) for v, n in zip(c.v, sizes[1:])),
                    jnp.pad(c.valid, ((0, 0), (0, sizes[0] - c.valid.shape[1]))), c.index)
    return loop._replace(cache=cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "eos_ids", "pad_id", "logprobs"),
                   donate_argnames=("loop",))
def _decode(graphdef, state, loop: Loop, limit, method, eos_ids: tuple[int, ...], pad_id: int,
            logprobs: bool = True) -> Loop:
    """Run decode steps until `limit` steps are sampled or every row is done (the cache must have a slot for each);
    `logprobs`: record each token's log probability (a log-softmax over the vocabulary per step, skipped when not
    asked for)."""
    Sampler.traces += 1
    model = nnx.merge(graphdef, state)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def cond(s: Loop):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: Loop) -> Loop:
        keys = jax.vmap(jax.random.fold_in, (0, None))(s.keys, s.step)
        token = method.select(s.logits, keys)
        logprob = (jnp.take_along_axis(jax.nn.log_softmax(s.logits, -1), token[:, None], -1)[:, 0] if logprobs
                   else jnp.zeros(token.shape, jnp.float32))
        token = jnp.where(s.done, pad_id, token)
        done = s.done | jnp.isin(token, eos)
        hidden, cache = model.forward(token[:, None], s.positions[:, None], cache=s.cache)
        cache = cache._replace(k=tuple(mesh_lib.constrain(k, CACHE_AXES) for k in cache.k),
                               v=tuple(mesh_lib.constrain(v, CACHE_AXES) for v in cache.v))
        return Loop(s.step + 1, done, model.logits(hidden[:, 0]), s.positions + 1,
                    s.tokens.at[:, s.step].set(token), s.logprobs.at[:, s.step].set(jnp.where(s.done, 0.0, logprob)),
                    s.keys, cache)

    return jax.lax.while_loop(cond, body, loop)


class Sampler:
    """Generate from `model` with `tokenizer`, on `mesh` if given (the model should already be placed on it)."""

    traces = 0  # jit traces of prefill/decode, process-wide: a test counts compilations with it

    def __init__(self, model: Transformer, tokenizer, mesh=None, max_batch: int = 32, min_prompt_bucket: int = 32):
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.max_batch, self.min_prompt_bucket = max_batch, min_prompt_bucket
        self.graphdef, self.state = nnx.split(model)
        eos = set(model.cfg.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = tuple(sorted(eos))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or (0,))[0]
        self.prefill_rows = 0  # prompt rows prefilled so far (n samples of a prompt share one)
        self.row_multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]

    # ------------------------------------------------------------------------------------------ public

    def generate(self, prompts: Sequence[str], n: int = 1, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, max_new_tokens: int = 64, stop: Sequence[str] | None = None,
                 seed: int = 0, chat: bool = False, logprobs: bool = False, progress: bool = True,
                 prompt_keys: Sequence[int] | None = None, first_sample: int = 0) -> list[list[Sample]]:
        """`out[i][j]` is sample j of prompt i. Sample j of prompt i draws from a key made of (seed, prompt_keys[i]
        (default: i), first_sample + j): give stable `prompt_keys` to get the same samples for a prompt in any call,
        and `first_sample` to draw a prompt's samples a few at a time (vote-aware sampling)."""
        if isinstance(prompts, str):
            raise S2DError("prompts: expected a list of strings, got one string")
        if n < 1 or max_new_tokens < 1:
            raise S2DError(f"n={n}, max_new_tokens={max_new_tokens}: both must be >= 1")
        method = make_method(temperature, top_k, top_p)
        if not prompts:
            return []
        texts = [chat_prompt(self.tokenizer, p) if chat else p for p in prompts]
        ids = [self.tokenizer(t, add_special_tokens=not chat).input_ids for t in texts]
        limit = self.model.cfg.max_position_embeddings
        for i, row in enumerate(ids):
            if not row:
                raise S2DError(f"prompt {i}: empty after tokenization")
            if len(row) + max_new_tokens > limit:
                raise S2DError(f"prompt {i}: {len(row)} tokens + max_new_tokens={max_new_tokens} = "
                               f"{len(row) + max_new_tokens} exceeds the model's context of {limit} positions")
        key_ids = list(range(len(ids))) if prompt_keys is None else [int(k) % (1 << 31) for k in prompt_keys]
        if len(key_ids) != len(ids):
            raise S2DError(f"prompt_keys: {len(key_ids)} keys for {len(ids)} prompts")
        per_batch = max(1, self.max_batch // n)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a bucket
        out: list[list[Sample] | None] = [None] * len(ids)
        bar = tqdm(total=len(ids), desc="sampling", unit="prompt", disable=not progress or jax.process_index() != 0)
        generated, start = 0, time.perf_counter()
        for b in range(0, len(order), per_batch):
            batch = order[b:b + per_batch]
            samples = self._generate_batch([ids[i] for i in batch], [key_ids[i] for i in batch], n, method,
                                           max_new_tokens, stop, seed, logprobs, first_sample)
            for i, s in zip(batch, samples):
                out[i] = s
                generated += sum(x.num_tokens for x in s)
            bar.update(len(batch))
            bar.set_postfix(tokens_per_s=f"{generated / (time.perf_counter() - start):.0f}")
        bar.close()
        return out

    # ------------------------------------------------------------------------------------------ batches

    def _generate_batch(self, rows, key_ids, n, method, max_new, stop, seed, want_logprobs, first_sample=0):
        cfg = self.model.cfg
        longest = max(map(len, rows))  # its bucket, less where the bucket would leave no room for max_new tokens
        prompt_len = max(min(_bucket(longest, self.min_prompt_bucket), cfg.max_position_embeddings - max_new), longest)
        new_len = _bucket(max_new, 16)
        max_len = min(prompt_len + new_len, cfg.max_position_embeddings)
        num = _bucket(len(rows), 1)
        while num * n % self.row_multiple:  # rows divide evenly over the mesh's data axes
            num += 1
        tokens = np.full((num, prompt_len), self.pad_id, np.int32)
        positions = np.zeros((num, prompt_len), np.int32)
        segments = np.zeros((num, prompt_len), np.int32)
        lengths = np.ones(num, np.int32)
        for r, row in enumerate(rows):
            pad = prompt_len - len(row)
            tokens[r, pad:], positions[r, pad:], segments[r, pad:], lengths[r] = row, np.arange(len(row)), 1, len(row)
        segments[len(rows):, -1] = 1  # filler rows: one dummy token, so no row is empty
        batch = num * n
        base = jax.random.key(seed)
        prompt_ids = np.repeat(np.asarray(list(key_ids) + [-1] * (num - len(rows))), n)
        sample_ids = np.tile(np.arange(n) + first_sample, num)
        keys = jax.vmap(lambda p, s: jax.random.fold_in(jax.random.fold_in(base, p), s))(prompt_ids, sample_ids)
        self.prefill_rows += len(rows)
        with self._mesh_context():
            put = self._put
            logits, cache = _prefill(self.graphdef, self.state, put(tokens), put(positions), put(segments),
                                     n=n, max_len=min(max_len, prompt_len + LIVE_BUCKET))
            loop = Loop(jnp.int32(0), put(np.repeat(np.arange(num) >= len(rows), n)), logits,
                        put(np.repeat(lengths, n)), put(np.full((batch, new_len), self.pad_id, np.int32)),
                        put(np.zeros((batch, new_len), np.float32)), put(keys), cache)
            stopped = np.zeros(batch, bool)
            chunk = STOP_CHUNK if stop else max_new
            while True:
                step = int(loop.step)
                live = min(max_len, prompt_len + -(-(step + 1) // LIVE_BUCKET) * LIVE_BUCKET)
                if live > loop.cache.valid.shape[1]:  # the next bucket of slots
                    loop = _grow(loop, (live,) + tuple(cache_slots(cfg, n, live) for n in range(cfg.num_layers)))
                upto = min(step + chunk, max_new, live - prompt_len)
                loop = _decode(self.graphdef, self.state, loop, jnp.int32(upto), method=method,
                               eos_ids=self.eos_ids, pad_id=self.pad_id, logprobs=want_logprobs)
                step, done = int(fetch(loop.step)), fetch(loop.done)
                if stop and step < max_new and not done.all():
                    toks = fetch(loop.tokens)[:, :step]
                    hits = [r for r in range(batch) if not done[r] and self._find_stop(toks[r], stop) is not None]
                    if hits:
                        stopped[hits] = True
                        loop = loop._replace(done=put(done | stopped))
                if step >= max_new or fetch(loop.done).all():
                    break
            toks, lps = fetch(loop.tokens), fetch(loop.logprobs)
        out = []
        for p in range(len(rows)):
            out.append([self._finish(toks[p * n + j, :max_new], lps[p * n + j, :max_new], stop, want_logprobs,
                                     len(rows[p])) for j in range(n)])
        return out

    def _finish(self, tokens, logprobs, stop, want_logprobs, prompt_tokens: int) -> Sample:
        tokens = [int(t) for t in tokens]
        count, reason = len(tokens), "length"
        for k, t in enumerate(tokens):
            if t in self.eos_ids:
                count, reason = k + 1, "stop"
                break
        if stop:
            cut = self._find_stop(tokens[:count], stop)
            if cut is not None:
                count, reason = cut, "stop"
        kept = tokens[:count]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        if reason == "stop" and stop:
            positions = [text.find(s) for s in stop if s in text]
            if positions:
                text = text[:min(positions)]
        return Sample(text, kept, count, reason, [float(x) for x in logprobs[:count]] if want_logprobs else None,
                      prompt_tokens)

    def _find_stop(self, tokens, stop) -> int | None:
        """The fewest leading tokens whose text contains a stop string, or None."""
        tokens = [int(t) for t in tokens]
        if not any(s in self.tokenizer.decode(tokens, skip_special_tokens=True) for s in stop):
            return None
        lo, hi = 1, len(tokens)  # text only grows with more tokens: binary search the first hit
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in self.tokenizer.decode(tokens[:mid], skip_special_tokens=True) for s in stop):
                hi = mid
            else:
                lo = mid + 1
        return lo

    # ------------------------------------------------------------------------------------------ devices

    def _mesh_context(self):
        import contextlib

        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _put(self, x):
        """Rows over the mesh's data axes; every host passes the same whole value (multi-host safe)."""
        if self.mesh is None:
            return jnp.asarray(x)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(self._put(np.asarray(jax.random.key_data(x))))
        return distributed.put(x, mesh_lib.named_sharding(("batch",) + (None,) * (np.ndim(x) - 1), np.shape(x),
                                                          self.mesh))
