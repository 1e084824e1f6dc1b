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
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from s2d_jax import mesh as mesh_lib
from s2d_jax.runtime import distributed
from s2d_jax.runtime import memory
from s2d_jax.errors import S2DError
from s2d_jax.model.transformer import Transformer
from s2d_jax.sampling import engine, fill, layouts, warmup as warmup_lib
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


@dataclasses.dataclass(frozen=True)
class Job:
    """`n` samples of one prompt; sample j draws from the key (seed, key, first_sample + j). `tag`: the caller's.
    `shared_prefix`: the prompt's first characters that other jobs' prompts start with too (BSM's solve: the same
    question and responses, one criterion each): jobs with the same prefix prefill it once. Such a job always takes
    the two-pass prefill (alone too), so its samples never depend on which jobs share its prefix."""

    prompt: str
    n: int = 1
    key: int = 0
    seed: int = 0
    max_new_tokens: int = 64
    first_sample: int = 0
    tag: Any = None
    shared_prefix: int = 0


def job_keys(jobs: Sequence[Job]) -> list[np.ndarray]:
    """Each job's `[n, key data]` sample keys, computed in one device call."""
    counts = [job.n for job in jobs]
    seeds = np.repeat([job.seed for job in jobs], counts)
    prompts = np.repeat([int(job.key) % (1 << 31) for job in jobs], counts)
    samples = np.concatenate([np.arange(job.n) + job.first_sample for job in jobs])
    data = np.asarray(jax.random.key_data(sample_keys(seeds, prompts, samples)))
    return np.split(data, np.cumsum(counts)[:-1])


class Sampler:
    """Generate from `model` with `tokenizer`, on `mesh` if given (the model should already be placed on it)."""

    @staticmethod
    def traces() -> int:
        """jit traces of the sampler's device functions so far, process-wide: tests count compilations with it."""
        return TRACES[0]

    def __init__(self, model: Transformer, tokenizer, mesh=None, max_batch: int = 32, min_prompt_bucket: int = 32,
                 continuous: bool = True, cache_dtype: str | None = None, warmup: bool = False, tail: bool = True):
        """`max_batch`: the engine's slots (rows decoded together); `continuous`: refill a slot as soon as its
        sample is done (else static batches: refill once every slot is free); `cache_dtype`: the KV cache's
        (default: the model's compute dtype; bfloat16 halves a float32 model's cache reads per step, int8 a
        bfloat16 one's: each vector with its own scale, model/quant.py); `warmup`:
        before a call's work, compile every program its queued prompts can meet (sampling/warmup.py); `tail`: once
        nothing is queued and few rows are live, decode them in a smaller slot shape (engine.tail_slots)."""
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.max_batch, self.min_prompt_bucket, self.continuous = max_batch, min_prompt_bucket, continuous
        self.graphdef, self.state = nnx.split(model)
        self.cache_dtype = jnp.dtype(cache_dtype or model.cfg.dtype)
        eos = set(model.cfg.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = tuple(sorted(eos))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or (0,))[0]
        self.prefill_rows = 0  # prompt rows prefilled so far (n samples of a prompt share one, as do shared prefixes)
        self.prefill_tokens = 0  # prompt tokens prefilled so far
        self.prefill_padded = 0  # token positions prefilled so far, padding included
        self.last_stats: dict = {}  # the last call's engine counts: decode steps, rows decoded, rows live
        self.warmup, self._warm, self.tail = warmup, set(), tail  # programs the warm-up ran already
        self.last_warmup = {"programs": 0, "seconds": 0.0}
        self.row_multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.slots = -(-max_batch // self.row_multiple) * self.row_multiple  # rows divide evenly over the mesh
        platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        self.fine_tail = engine.fine_tail(platform, model.cfg.num_params, self.slots)  # the tail by eighths too
        self.laid_out = platform not in layouts.PLATFORMS  # the weights in the decode's layouts (layouts.py)

    # ------------------------------------------------------------------------------------------ public

    def generate(self, prompts: Sequence[str], n: int = 1, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, max_new_tokens: int | Sequence[int] = 64,
                 stop: Sequence[str] | None = None,
                 seed: int = 0, chat: bool | str = False, logprobs: bool = False, progress: bool = True,
                 prompt_keys: Sequence[int] | None = None, first_sample: int = 0) -> list[list[Sample]]:
        """`out[i][j]` is sample j of prompt i. Sample j of prompt i draws from a key made of (seed, prompt_keys[i]
        (default: i), first_sample + j): give stable `prompt_keys` to get the same samples for a prompt in any call,
        and `first_sample` to draw a prompt's samples a few at a time (vote-aware sampling). `max_new_tokens`: one
        budget for all, or one per prompt. `chat`: True applies the chat template to each prompt (a user turn);
        "templated": the prompts are already templated (read without adding special tokens)."""
        if isinstance(prompts, str):
            raise S2DError("prompts: expected a list of strings, got one string")
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        key_ids = list(range(len(prompts))) if prompt_keys is None else list(prompt_keys)
        for name, values in (("max_new_tokens", budgets), ("prompt_keys", key_ids)):
            if len(values) != len(prompts):
                raise S2DError(f"{name}: {len(values)} values for {len(prompts)} prompts")
        jobs = [Job(p, n, k, seed, b, first_sample, tag=i)
                for i, (p, k, b) in enumerate(zip(prompts, key_ids, budgets))]
        out: list[list[Sample]] = [[] for _ in prompts]

        def on_done(job, samples):
            out[job.tag] = samples

        self.stream(jobs, on_done, temperature=temperature, top_k=top_k, top_p=top_p, stop=stop, chat=chat,
                    logprobs=logprobs, progress=progress)
        return out

    def stream(self, jobs: Sequence[Job], on_done: Callable[[Job, list[Sample]], Sequence[Job] | None], *,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               stop: Sequence[str] | None = None, chat: bool = False, logprobs: bool = False,
               progress: bool = True) -> None:
        """Run `jobs` through the engine; as each job's samples are all done, `on_done(job, samples)` is called
        and the jobs it returns join the queue (a program's next stage starts the moment its previous one ends,
        with no barrier between stages). A job's samples do not depend on when it was queued."""
        method = make_method(temperature, top_k, top_p)
        queue: deque = deque()
        pending: dict[int, list] = {}  # handle -> [job, prompt tokens, samples]
        bar = tqdm(desc="sampling", unit="call", disable=not progress or jax.process_index() != 0)
        counts = {"handles": 0, "generated": 0, "start": time.perf_counter()}

        def enqueue(new: Sequence[Job]) -> None:
            if not new:
                return
            ids = self._encode(new, chat, counts["handles"])
            keys = job_keys(new)
            order = sorted(range(len(new)), key=lambda i: -len(ids[i][0]))  # similar lengths share a prefill bucket
            for i in order:
                job, handle = new[i], counts["handles"] + i
                row, prefix = ids[i]
                pending[handle] = [job, len(row), [None] * job.n]
                queue.extend(fill.Request(handle, row, a, min(self.slots, job.n - a), keys[i][a:a + self.slots],
                                          job.max_new_tokens, prefix) for a in range(0, job.n, self.slots))
            counts["handles"] += len(new)
            bar.total = (bar.total or 0) + len(new)
            bar.refresh()

        def on_sample(handle, sample, tokens, lps):
            entry = pending[handle]
            job = entry[0]
            entry[2][sample] = s = self._finish(tokens, lps, stop, logprobs, entry[1])
            counts["generated"] += s.num_tokens
            if all(x is not None for x in entry[2]):
                del pending[handle]
                bar.update(1)
                bar.set_postfix(tokens_per_s=f"{counts['generated'] / (time.perf_counter() - counts['start']):.0f}")
                enqueue(list(on_done(job, entry[2]) or ()))

        enqueue(list(jobs))
        if not queue:
            return bar.close()
        with self._mesh_context():
            if not self.laid_out:  # once, before any program: every one then compiles for these layouts
                self.state = layouts.for_decode(self, engine.slot_shape(self, queue), method, logprobs)
                self.laid_out = True
            if self.warmup:
                t = time.perf_counter()
                with memory.program("warm-up", lambda: f"{self.slots} slots, the engine's programs for "
                                                       f"{len(queue)} queued prompts"):
                    ran = warmup_lib.warmup(self, queue, method, logprobs, self._warm)
                self.last_warmup = {"programs": ran, "seconds": time.perf_counter() - t}
                counts["start"] = time.perf_counter()
            self.last_stats = engine.generate(self, queue, method, stop, logprobs, self.continuous, on_sample)
        bar.close()

    def _encode(self, jobs: Sequence[Job], chat: bool, first_handle: int) -> list[tuple[list[int], int]]:
        """Token ids of each job's prompt (with the chat template when `chat`), checked against the context, and
        how many of them are its shared prefix (`_prefix_tokens`)."""
        limit = self.model.cfg.max_position_embeddings
        out, heads = [], {}  # heads: a shared prefix's text -> its tokens (tokenized once for all its jobs)
        for i, job in enumerate(jobs):
            if not isinstance(job.prompt, str):
                raise S2DError(f"prompt {first_handle + i}: expected a string, got {type(job.prompt).__name__}")
            if job.n < 1 or job.max_new_tokens < 1:
                raise S2DError(f"n={job.n}, max_new_tokens={job.max_new_tokens}: both must be >= 1")
            text = chat_prompt(self.tokenizer, job.prompt) if chat is True else job.prompt
            row = self.tokenizer(text, add_special_tokens=not chat).input_ids
            if not row:
                raise S2DError(f"prompt {first_handle + i}: empty after tokenization")
            if len(row) + job.max_new_tokens > limit:
                raise S2DError(f"prompt {first_handle + i}: {len(row)} tokens + max_new_tokens={job.max_new_tokens} = "
                               f"{len(row) + job.max_new_tokens} exceeds the model's context of {limit} positions")
            out.append((row, self._prefix_tokens(text, row, job, chat, heads)))
        return out

    def _prefix_tokens(self, text: str, row: list[int], job: Job, chat: bool, heads: dict) -> int:
        """Leading tokens of `row` that lie in the job's shared prefix: those the prefix's text alone tokenizes to
        as well (a token across the boundary may differ), a function of this prompt alone; at least one token is
        left to the suffix. 0 where the prompt has none, or the chat template changed its text."""
        head = job.prompt[:job.shared_prefix]
        at = text.find(head) if head else -1
        if at < 0:
            return 0
        head = text[:at + len(head)]
        if head not in heads:
            heads[head] = self.tokenizer(head, add_special_tokens=not chat).input_ids
        ids = heads[head]
        k = next((i for i, (a, b) in enumerate(zip(ids, row)) if a != b), min(len(ids), len(row)))
        return min(k, len(row) - 1)  # rows are never empty: k >= 0

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
