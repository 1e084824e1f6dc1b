"""The rollout engine: a fixed number of slots decoding on device, refilled from a queue between chunks of steps.

Each slot is one (prompt, sample) row of the KV cache with its own write index, position, step count, budget and
PRNG key. The host loop (`generate`) alternates two device calls:

- **insert**: waiting prompts are prefilled together (one row per prompt, however many samples it asks for),
  and each prefilled row is copied into as many free slots as it has samples (a prompt whose samples do not all
  fit takes the free slots now and is prefilled again for the rest: a short prefill beats idle slots);
- **decode**: up to `chunk` steps for every slot, until each is done (EOS, its budget) or the chunk ends.

Between them the host retires finished slots (and rows that produced a stop string) and, with `continuous`, fills
the freed slots at once; without it (static batches), only once every slot is free. A sample's token at step t is
drawn with its own key folded with t, and its row never reads another row: results do not depend on which slot it
had, its neighbours, the slot count or the device count. Every shape is bucketed (slots; prompt lengths four per
octave; the live cache width in LIVE_BUCKET steps, four per octave past GEOMETRIC; prefill rows in power-of-two
chunks: cache.py), so compiles are bounded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2d_jax import mesh as mesh_lib
from s2d_jax.runtime import faults, stopping
from s2d_jax.runtime import memory
from s2d_jax.runtime.distributed import fetch
from s2d_jax.model.quant import kv_store
from s2d_jax.model.transformer import KVCache
from s2d_jax.sampling import cache as cache_lib
from s2d_jax.sampling.clock import Clock
from s2d_jax.sampling import fill
from s2d_jax.sampling.cache import TRACES, bucket

CHUNK = 16  # decode steps between host visits (retire, refill, stop strings)


class Slots(NamedTuple):
    """Every slot's decode state; lives on device between calls."""

    done: jax.Array  # [S] bool: finished, or empty
    count: jax.Array  # [S] tokens sampled so far
    budget: jax.Array  # [S] tokens it may sample
    logits: jax.Array  # [S, V] logits for its next token
    positions: jax.Array  # [S] position of its next token
    tokens: jax.Array  # [S, max_new] int32
    logprobs: jax.Array  # [S, max_new] float32
    keys: jax.Array  # [S] PRNG keys of its sample
    cache: KVCache  # index [S]: each slot's next cache slot


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the device functions need to know of the model and the call (hashable: a static jit argument)."""

    slots: int
    max_new: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype: str
    pad_id: int


def slot_shape(sampler, queue) -> Shape:
    """The slots' shape for `queue`'s requests: token buffers as long as the largest budget (bucketed)."""
    cfg = sampler.model.cfg
    return Shape(sampler.slots, bucket(max(q.budget for q in queue), 16), cfg.num_kv_heads, cfg.head_dim,
                 cfg.vocab_size, str(sampler.cache_dtype), sampler.pad_id)


def _rows(x):
    return mesh_lib.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def _logits(x):
    """The slots' next-token logits as the head leaves them, the vocabulary over `tensor`: held whole on every chip,
    they were 33 MB a chip at 64 slots of Llama 3 and the decode's input and output differed in layout (so it was
    neither donated nor one program per shape)."""
    return mesh_lib.constrain(x, ("batch", "vocab"))


@functools.partial(jax.jit, static_argnames=("shape", "sizes"))
def empty(shape: Shape, sizes: tuple[int, ...]) -> Slots:
    """Empty (done) slots with a cache of `sizes` (cache.layer_sizes)."""
    TRACES[0] += 1
    s = shape.slots
    kv = lambda n: kv_store(jnp.zeros((s, shape.kv_heads, n, shape.head_dim), jnp.float32), shape.dtype)
    cache = cache_lib.constrain(KVCache(tuple(kv(n) for n in sizes[1:]), tuple(kv(n) for n in sizes[1:]),
                                        _rows(jnp.zeros((s, sizes[0]), bool)), _rows(jnp.zeros(s, jnp.int32))))
    zeros = lambda *dims, dtype=jnp.int32: _rows(jnp.zeros((s,) + dims, dtype))
    return Slots(_rows(jnp.ones(s, bool)), zeros(), zeros(), _logits(jnp.zeros((s, shape.vocab), jnp.float32)), zeros(),
                 _rows(jnp.full((s, shape.max_new), shape.pad_id, jnp.int32)), zeros(shape.max_new, dtype=jnp.float32),
                 jax.random.split(jax.random.key(0), s), cache)


@functools.partial(jax.jit, static_argnames=("pad_id",), donate_argnames=("slots",))
def insert(slots: Slots, logits, cache: KVCache, rows, positions, budget, keys, pad_id: int) -> Slots:
    """Slot `r` takes prefilled row `rows[r]` (-1: it keeps what it holds): its cache row (padded to the slots'
    sizes with empty slots), next-token logits, and `positions[r]`, `budget[r]`, `keys[r]`; its step count and
    tokens start afresh. The prefill's cache has only its prompt's slots, so one prefill compile serves every cache
    width. A gather from the prefill's few rows and a select per slot, not a scatter into the slots: XLA meets a
    scatter into row-sharded slots by gathering every slot's cache onto every device (`s2d plan` for an 8B model
    on a v5e-8: 4 GB of temporaries)."""
    TRACES[0] += 1
    take, src = rows >= 0, jnp.maximum(rows, 0)
    pick = lambda old, new: jnp.where(take.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
    c = slots.cache
    cache = cache_lib.resize(cache, (c.valid.shape[1],) + tuple(k.shape[2] for k in c.k))
    layers = lambda old, new: tuple(jax.tree.map(lambda o_, n_: pick(o_, n_[src]), o, n) for o, n in zip(old, new))
    index = cache.index[src] if cache.index.ndim else jnp.broadcast_to(cache.index, src.shape)
    new = KVCache(layers(c.k, cache.k), layers(c.v, cache.v), pick(c.valid, cache.valid[src]), pick(c.index, index))
    key_data = jax.random.key_data
    return Slots(pick(slots.done, False), pick(slots.count, 0), pick(slots.budget, budget),
                 _logits(pick(slots.logits, logits[src])), pick(slots.positions, positions), pick(slots.tokens, pad_id),
                 pick(slots.logprobs, 0.0), jax.random.wrap_key_data(pick(key_data(slots.keys), key_data(keys))),
                 cache_lib.constrain(new))


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "eos_ids", "pad_id", "logprobs"),
                   donate_argnames=("slots",))
def decode(graphdef, state, slots: Slots, steps, method, eos_ids: tuple[int, ...], pad_id: int,
           logprobs: bool = False) -> Slots:
    """Up to `steps` decode steps for every slot, fewer once all are done (the cache must have room for them).
    `logprobs`: record each token's log probability (a log-softmax over the vocabulary, only when asked for)."""
    TRACES[0] += 1
    model = nnx.merge(graphdef, state)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
    rows = jnp.arange(slots.done.shape[0])

    def body(carry):
        i, s = carry
        live = ~s.done
        token = method.select(s.logits, jax.vmap(jax.random.fold_in)(s.keys, s.count))
        token = jnp.where(live, token, pad_id)
        col = jnp.minimum(s.count, s.tokens.shape[1] - 1)
        tokens = s.tokens.at[rows, col].set(jnp.where(live, token, s.tokens[rows, col]))
        lps = s.logprobs
        if logprobs:
            lp = jnp.take_along_axis(jax.nn.log_softmax(s.logits, -1), token[:, None], -1)[:, 0]
            lps = lps.at[rows, col].set(jnp.where(live, lp, lps[rows, col]))
        count = s.count + live
        done = s.done | jnp.isin(token, eos) | (count >= s.budget)
        hidden, cache = model.forward(token[:, None], s.positions[:, None], cache=s.cache)
        cache = cache_lib.constrain(cache._replace(index=jnp.where(live, cache.index, s.cache.index)))
        return i + 1, Slots(done, count, s.budget, _logits(model.logits(hidden[:, 0])), s.positions + live, tokens, lps,
                            s.keys, cache)

    cond = lambda carry: (carry[0] < steps) & ~jnp.all(carry[1].done)
    return jax.lax.while_loop(cond, body, (jnp.int32(0), slots))[1]


@functools.partial(jax.jit, static_argnames=("sizes",))
def resize(slots: Slots, sizes: tuple[int, ...]) -> Slots:
    """The slots with a cache of `sizes` (not donated: no buffer of a new size could reuse the old ones)."""
    TRACES[0] += 1
    return slots._replace(cache=cache_lib.resize(slots.cache, sizes))


TAIL = 4  # the tail's slot shapes: a quarter of the slots, a sixteenth, ...
FINE_ROWS = 8  # with a fine tail, also every multiple of an eighth of the slots, at least this many rows
FINE_FLOPS = 1e9  # ... once an eighth of the slots' products reach this many FLOPs (several ms of a CPU)


def fine_tail(platform: str, num_params: int, slots: int) -> bool:
    """Whether the tail also takes eighths of the slots: on CPU, where a step costs its rows' products, once an
    eighth of the slots' products (2 x parameters x rows) reach FINE_FLOPS (SmolLM2-135M at 64 slots: 2.2 GFLOP,
    about 16 ms of a 64-row step's 165 here). Below that a step is its fixed costs, and each shape only one more
    compile (the demo's 0.5M-parameter model at 64 slots: 5 s more warm-up, no faster)."""
    return platform == "cpu" and 2 * num_params * (slots // 8) >= FINE_FLOPS


def tail_shapes(slots: int, multiple: int, fine: bool) -> list[int]:
    """The slot counts the tail decodes in, largest (all `slots`) first: `slots / TAIL^k` while a multiple of
    `multiple` (the mesh's row divisor); with `fine`, also every multiple of an eighth of the slots (at least
    FINE_ROWS rows, a multiple of `multiple`). Fine is for CPUs, where a step costs its rows' products (a one-wave
    call of 64 rows decodes 22% fewer rows); a memory-bound accelerator pays mostly for the weights it reads,
    whatever the rows, and each shape is one more compile."""
    out, s = {slots}, slots
    while s % (TAIL * multiple) == 0:
        s //= TAIL
        out.add(s)
    if fine:
        unit = max(slots // 8 // multiple, -(-FINE_ROWS // multiple)) * multiple
        out.update(range(unit, slots, unit))
    return sorted(out, reverse=True)


def tail_slots(slots: int, live: int, multiple: int, fine: bool = False) -> int:
    """The slot count `live` rows decode in once nothing is queued: the smallest tail shape that holds them."""
    return min(s for s in tail_shapes(slots, multiple, fine) if s >= live)


@jax.jit
def reslot(slots: Slots, idx) -> Slots:
    """Slot r of the result is slot `idx[r]` (-1: an empty one): the tail's smaller slot shape, and back."""
    TRACES[0] += 1
    src, empty_row = jnp.maximum(idx, 0), idx < 0
    take = lambda x: x[src]
    cache = slots.cache
    layer = lambda c: jax.tree.map(take, c)
    new = KVCache(tuple(map(layer, cache.k)), tuple(map(layer, cache.v)), take(cache.valid) & ~empty_row[:, None],
                  take(cache.index))
    return Slots(_rows(take(slots.done) | empty_row), *(_rows(take(x)) for x in slots[1:7]), take(slots.keys),
                 cache_lib.constrain(new))


@functools.partial(jax.jit, static_argnames=("max_new",))
def widen(slots: Slots, max_new: int) -> Slots:
    """Room for `max_new` tokens per slot."""
    TRACES[0] += 1
    pad = lambda x: jnp.pad(x, ((0, 0), (0, max_new - x.shape[1])))
    return slots._replace(tokens=pad(slots.tokens), logprobs=pad(slots.logprobs))


def generate(sampler, queue: deque, method, stop, want_logprobs: bool, continuous: bool, on_sample,
             chunk: int = CHUNK) -> dict:
    """Run the requests of `queue` through `sampler.slots` slots; call `on_sample(prompt, sample index, tokens,
    logprobs)` as each sample finishes (it may append requests to `queue`). Returns counts for benchmarks: decode
    steps, rows decoded, rows that were live, where the call's seconds went (clock.Clock.report) and its jit traces."""
    cfg = sampler.model.cfg
    ctx = cfg.max_position_embeddings
    n_slots = sampler.slots
    shape = slot_shape(sampler, queue)
    put = sampler._put
    owner: list[tuple[int, int, int, int] | None] = [None] * n_slots  # (prompt, sample, prompt bucket, budget)
    count = np.zeros(n_slots, np.int64)
    width = cache_lib.LIVE_BUCKET
    clock, traces = Clock(), TRACES[0]
    with clock("resize") as out:
        slots = empty(shape, cache_lib.layer_sizes(cfg, width))
        out.append(slots)
    stats = {"steps": 0, "rows": 0, "live_rows": 0}

    def fit(need: int):
        """Resize the cache to the bucket of `need` slots (grow or, once long rows are gone, shrink)."""
        nonlocal slots, width
        target = cache_lib.width_bucket(need)
        target = target if need > ctx else min(target, ctx)  # (a shared-prefix layout may pass the context)
        if target != width:
            with clock("resize") as out:
                slots, width = resize(slots, cache_lib.layer_sizes(cfg, target)), target
                out.append(slots)

    def every_slot():
        """Back to all the slots from a tail shape (rows keep their slot)."""
        nonlocal slots, owner, count, n_slots
        idx = np.concatenate([np.arange(n_slots), np.full(sampler.slots - n_slots, -1)]).astype(np.int32)
        with clock("resize") as out:
            slots = reslot(slots, put(idx))
            out.append(slots)
        owner, count, n_slots = owner + [None] * (len(idx) - n_slots), np.pad(count, (0, len(idx) - n_slots)), len(idx)

    while queue or any(o is not None for o in owner):
        stopping.check()  # SIGTERM / SIGINT: every host stops here alike (s2d_jax/runtime/stopping.py)
        faults.point("decode-chunk")
        if queue and n_slots < sampler.slots:  # new requests after a tail: every slot back
            every_slot()
        free = [r for r in range(n_slots) if owner[r] is None]
        if queue and (len(free) == n_slots or continuous and free):
            taken, room = [], len(free)
            while queue and room:
                head = queue[0]
                if head.count <= room:
                    taken.append(queue.popleft())
                    room -= head.count
                elif continuous:  # its first samples now, the rest when slots free up (one more prefill of it)
                    taken.append(dataclasses.replace(head, count=room, keys=head.keys[:room]))
                    queue[0] = dataclasses.replace(head, first=head.first + room, count=head.count - room,
                                                   keys=head.keys[room:])
                    room = 0
                else:
                    break
            if max(q.budget for q in taken) > shape.max_new:  # a later stage with a larger budget
                shape = dataclasses.replace(shape, max_new=bucket(max(q.budget for q in taken), 16))
                with clock("resize") as out:
                    slots = widen(slots, shape.max_new)
                    out.append(slots)
            # prompts with a shared prefix take the two-pass prefill, always (alone too): a prompt's numbers
            # never depend on its neighbours
            plain, shared = [q for q in taken if not q.prefix], [q for q in taken if q.prefix]
            for group, num in fill.chunks(sampler, plain, sampler.row_multiple) + ([(shared, None)] if shared else []):
                p_len = fill.prefill_len(sampler, group)
                live = [owner[r][2] + count[r] for r in range(n_slots) if owner[r] is not None]
                fit(max(live + [p_len + 1]))
                with memory.program("prefill", lambda: f"{len(group)} prompts x {p_len} tokens, {n_slots} slots x "
                                                       f"{width} cache positions"), clock("prefill") as out:
                    logits, new = (fill.prefill_shared(sampler, group, p_len) if group[0].prefix
                                   else fill.prefill(sampler, group, p_len, num))
                    out.append(logits)
                rows = np.full(n_slots, -1, np.int32)  # slot -> its prefilled row (-1: keeps what it holds)
                positions, budget = np.zeros(n_slots, np.int32), np.zeros(n_slots, np.int32)
                keys = np.zeros((n_slots,) + group[0].keys.shape[1:], group[0].keys.dtype)
                for u, q in enumerate(group):
                    for j in range(q.count):
                        r = free.pop(0)
                        rows[r], positions[r], budget[r], keys[r] = u, len(q.ids), q.budget, q.keys[j]
                        owner[r], count[r] = (q.prompt, q.first + j, p_len, q.budget), 0
                with clock("insert") as out:
                    slots = insert(slots, logits, new, put(rows), put(positions), put(budget),
                                   jax.random.wrap_key_data(put(keys)), pad_id=sampler.pad_id)
                    out.append(slots)
        active = [r for r in range(n_slots) if owner[r] is not None]
        smaller = (tail_slots(sampler.slots, len(active), sampler.row_multiple, sampler.fine_tail)
                   if sampler.tail and not queue else n_slots)
        if smaller < n_slots:  # the tail: the last live rows decode in a smaller slot shape
            if n_slots < sampler.slots:  # a smaller tail shape through the full one: 2 programs a shape, not 1 a pair
                every_slot()
            idx = np.array(active + [r for r in range(n_slots) if owner[r] is None][:smaller - len(active)], np.int32)
            with clock("resize") as out:
                slots = reslot(slots, sampler._put(idx))
                out.append(slots)
            owner, count, n_slots = [owner[r] for r in idx], count[idx], smaller
            active = list(range(len(active)))
        fit(max(owner[r][2] + count[r] + 1 for r in active))
        room = [width - owner[r][2] - count[r] for r in active if owner[r][2] + owner[r][3] > width]
        steps = min([chunk] + room)
        with memory.program("decode", lambda: f"{n_slots} slots x {width} cache positions, {steps} steps"), \
                clock("decode"):
            slots = decode(sampler.graphdef, sampler.state, slots, jnp.int32(steps), method=method,
                           eos_ids=sampler.eos_ids, pad_id=sampler.pad_id, logprobs=want_logprobs)
            done, new_count = np.array(fetch(slots.done)), fetch(slots.count).astype(np.int64)
        ran = int((new_count - count)[active].max(initial=0))
        stats["steps"] += ran
        stats["rows"] += ran * n_slots
        stats["live_rows"] += int((new_count - count)[active].sum())
        count = new_count
        finished = [r for r in active if done[r]]
        if stop or finished:
            tokens = fetch(slots.tokens)
            if stop:
                hits = [r for r in active if not done[r] and sampler._find_stop(tokens[r, :count[r]], stop) is not None]
                if hits:
                    done[hits] = True
                    slots = slots._replace(done=put(done))
                    finished += hits
            lps = fetch(slots.logprobs) if want_logprobs else None
            for r in sorted(finished):
                prompt, sample = owner[r][:2]
                on_sample(prompt, sample, tokens[r, :count[r]], None if lps is None else lps[r, :count[r]])
                owner[r] = None
    return stats | clock.report() | {"traces": TRACES[0] - traces}
