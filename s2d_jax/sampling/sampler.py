"""The public sampler: prompts in, `Sample`s out; the rollout engine (engine.py) does the device work.

- Prompts are tokenized (with the chat template when asked), checked against the model's context, and queued
  longest first, so prompts of similar length share a prefill bucket.
- `n` samples of a prompt share one prefill; each (prompt, sample) draws from its own key made of (seed, prompt
  key, sample index), so results do not depend on batching, slots or devices.
- Stop strings are checked on host between chunks of decode steps, never per token; EOS and budgets on device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from s2d_jax import distributed, mesh as mesh_lib
from s2d_jax.errors import S2DError
from s2d_jax.model.transformer import Transformer
from s2d_jax.sampling import engine
from s2d_jax.sampling.cache import TRACES, sample_keys
from s2d_jax.sampling.select import make_method
from s2d_jax.tokenizer import chat_prompt


@dataclasses.dataclass
class Sample:
    text: str
    token_ids: list[int]
    num_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    logprobs: list[float] | None = None
    prompt_tokens: int = 0  # tokens of the prompt as the model read it (chat template included)


class Sampler:
    """Generate from `model` with `tokenizer`, on `mesh` if given (the model should already be placed on it)."""

    @staticmethod
    def traces() -> int:
        """jit traces of the sampler's device functions so far, process-wide: tests count compilations with it."""
        return TRACES[0]

    def __init__(self, model: Transformer, tokenizer, mesh=None, max_batch: int = 32, min_prompt_bucket: int = 32,
                 continuous: bool = True):
        """`max_batch`: the engine's slots (rows decoded together); `continuous`: refill a slot as soon as its
        sample is done (else static batches: refill once every slot is free)."""
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.max_batch, self.min_prompt_bucket, self.continuous = max_batch, min_prompt_bucket, continuous
        self.graphdef, self.state = nnx.split(model)
        eos = set(model.cfg.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = tuple(sorted(eos))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or (0,))[0]
        self.prefill_rows = 0  # prompt rows prefilled so far (n samples of a prompt share one)
        self.last_stats: dict = {}  # the last call's engine counts: decode steps, rows decoded, rows live
        self.row_multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]

    # ------------------------------------------------------------------------------------------ public

    def generate(self, prompts: Sequence[str], n: int = 1, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, max_new_tokens: int | Sequence[int] = 64, stop: Sequence[str] | None = None,
                 seed: int = 0, chat: bool = False, logprobs: bool = False, progress: bool = True,
                 prompt_keys: Sequence[int] | None = None, first_sample: int = 0) -> list[list[Sample]]:
        """`out[i][j]` is sample j of prompt i. Sample j of prompt i draws from a key made of (seed, prompt_keys[i]
        (default: i), first_sample + j): give stable `prompt_keys` to get the same samples for a prompt in any call,
        and `first_sample` to draw a prompt's samples a few at a time (vote-aware sampling). `max_new_tokens`: one
        budget for all, or one per prompt."""
        if isinstance(prompts, str):
            raise S2DError("prompts: expected a list of strings, got one string")
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(budgets) != len(prompts):
            raise S2DError(f"max_new_tokens: {len(budgets)} budgets for {len(prompts)} prompts")
        if n < 1 or min(budgets, default=1) < 1:
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
            if len(row) + budgets[i] > limit:
                raise S2DError(f"prompt {i}: {len(row)} tokens + max_new_tokens={budgets[i]} = "
                               f"{len(row) + budgets[i]} exceeds the model's context of {limit} positions")
        key_ids = list(range(len(ids))) if prompt_keys is None else [int(k) % (1 << 31) for k in prompt_keys]
        if len(key_ids) != len(ids):
            raise S2DError(f"prompt_keys: {len(key_ids)} keys for {len(ids)} prompts")
        slots = -(-self.max_batch // self.row_multiple) * self.row_multiple
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a prefill bucket
        keys = np.asarray(jax.random.key_data(sample_keys(
            seed, np.repeat(np.asarray(key_ids), n), np.tile(np.arange(n) + first_sample, len(ids))))).reshape(
            len(ids), n, -1)
        requests = [engine.Request(i, ids[i], a, min(slots, n - a), keys[i, a:a + slots], budgets[i])
                    for i in order for a in range(0, n, slots)]
        out: list[list[Sample | None]] = [[None] * n for _ in ids]
        left = [n] * len(ids)
        bar = tqdm(total=len(ids), desc="sampling", unit="prompt", disable=not progress or jax.process_index() != 0)
        generated, start = 0, time.perf_counter()

        def on_sample(i, sample, tokens, lps):
            nonlocal generated
            out[i][sample - first_sample] = s = self._finish(tokens, lps, stop, logprobs, len(ids[i]))
            generated += s.num_tokens
            left[i] -= 1
            if not left[i]:
                bar.update(1)
                bar.set_postfix(tokens_per_s=f"{generated / (time.perf_counter() - start):.0f}")

        with self._mesh_context():
            self.last_stats = engine.generate(self, requests, method, stop, logprobs, self.continuous,
                                              on_sample)
        bar.close()
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
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _put(self, x):
        """Rows over the mesh's data axes; every host passes the same whole value (multi-host safe)."""
        if self.mesh is None:
            return jnp.asarray(x)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(self._put(np.asarray(jax.random.key_data(x))))
        return distributed.put(x, mesh_lib.named_sharding(("batch",) + (None,) * (np.ndim(x) - 1), np.shape(x),
                                                          self.mesh))
