"""Compile before the timed work: every program the engine can call for a queue of known prompts.

The engine's shapes are bucketed (cache.py), so the programs a queue can meet form a small known set: for each
prompt length bucket and each prefill row chunk a fill can take, a prefill and its insert at every cache width the
rows can reach; a decode and a resize between any two of those widths. Each is run once here on empty inputs (a
decode of done slots stops at once; an insert with no rows keeps every slot), so the jit caches hold them all and
the run itself traces nothing new; with the persistent cache (compile_cache.py) a later process loads them from
disk. Prompts that are not known yet (a program's later stages) still compile when met.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax.sampling import cache as cache_lib
from s2d_jax.sampling import engine, fill


def _idx(put, rows: int, total: int | None = None):
    """`reslot` indices: the first `rows` slots, padded with empty ones to `total`."""
    return put(np.concatenate([np.arange(rows), np.full((total or rows) - rows, -1)]).astype(np.int32))


def programs(sampler, queue) -> tuple[engine.Shape, list[int], list[int], list[int]]:
    """The slots' shape, prefill row chunks, prefill lengths and cache widths `queue`'s requests can meet."""
    cfg = sampler.model.cfg
    n, ctx = sampler.slots, cfg.max_position_embeddings
    budget = max(q.budget for q in queue)
    shape = engine.slot_shape(sampler, queue)
    plain = [q for q in queue if not q.prefix]
    per_fill = max(1, n // max(1, min((q.count for q in plain), default=1)))  # prompts one fill can take
    rows = sorted({c for k in range(1, per_fill + 1) for c in cache_lib.row_chunks(k, sampler.row_multiple)})
    lengths = sorted({fill.prefill_len(sampler, [q]) for q in plain})
    fit = lambda need: cache_lib.width_bucket(need) if need > ctx else min(cache_lib.width_bucket(need), ctx)
    top = max(lengths, default=0) + budget
    widths = sorted({cache_lib.LIVE_BUCKET} | {fit(x) for x in range(min(lengths, default=top) + 1, top + 1)})
    return shape, rows, lengths, widths


def warmup(sampler, queue, method, want_logprobs: bool, seen: set) -> int:
    """Run every program `programs(sampler, queue)` names that is not in `seen` (adds them), one cache width at a
    time (no more device memory than the run's own widest slots); returns how many ran."""
    if not queue:
        return 0
    cfg, put = sampler.model.cfg, sampler._put
    shape, rows, lengths, widths = programs(sampler, queue)
    sizes = lambda w: cache_lib.layer_sizes(cfg, w)
    key = lambda *k: (shape, method, want_logprobs) + k
    counts = sampler.prefill_rows, sampler.prefill_tokens, sampler.prefill_padded
    none = put(np.full(shape.slots, -1, np.int32))
    zeros = put(np.zeros(shape.slots, np.int32))
    keys = jax.random.wrap_key_data(put(np.zeros((shape.slots,) + jax.random.key_data(jax.random.key(0)).shape,
                                                 np.uint32)))
    ran, prefilled = 0, {}
    for w in widths:
        tails = engine.tail_shapes(shape.slots, sampler.row_multiple, sampler.fine_tail)[1:] if sampler.tail else []
        todo = [k for k in [("decode",)] + [("resize", b) for b in widths if b != w]
                + [("insert", r, p) for r in rows for p in lengths if w > p]
                + [("tail", m) for m in tails] if key(w, *k) not in seen]
        if not todo:
            continue
        slots = engine.empty(shape, sizes(cache_lib.LIVE_BUCKET))
        slots = slots if w == cache_lib.LIVE_BUCKET else engine.resize(slots, sizes(w))
        for kind, *at in todo:
            if kind == "decode":
                slots = engine.decode(sampler.graphdef, sampler.state, slots, jnp.int32(0), method=method,
                                      eos_ids=sampler.eos_ids, pad_id=sampler.pad_id, logprobs=want_logprobs)
            elif kind == "resize":
                jax.block_until_ready(engine.resize(slots, sizes(at[0])))
            elif kind == "tail":  # into a tail shape from the full one, decode, and back (as the engine moves)
                small = engine.reslot(slots, _idx(put, at[0]))
                small = engine.decode(sampler.graphdef, sampler.state, small, jnp.int32(0), method=method,
                                      eos_ids=sampler.eos_ids, pad_id=sampler.pad_id, logprobs=want_logprobs)
                jax.block_until_ready(engine.reslot(small, _idx(put, at[0], shape.slots)))
            else:
                if tuple(at) not in prefilled:
                    r, p = at
                    group = [fill.Request(0, [sampler.pad_id] * p, 0, 1, None, 1)] * r
                    prefilled[tuple(at)] = fill.prefill(sampler, group, p, r)
                slots = engine.insert(slots, *prefilled[tuple(at)], none, zeros, zeros, keys, pad_id=sampler.pad_id)
            seen.add(key(w, kind, *at))
            ran += 1
        jax.block_until_ready(slots)
    sampler.prefill_rows, sampler.prefill_tokens, sampler.prefill_padded = counts  # the work's counts, not these
    return ran
