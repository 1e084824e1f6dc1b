"""How queued prompts become prefill calls: the width each group pads to, the row chunks it is prefilled in, and
the calls themselves (left-padded prompts; or each distinct shared prefix once, then every suffix against it).
The engine (engine.py) calls these for every fill; the warm-up (warmup.py) for every shape a queue can meet."""

from __future__ import annotations

import dataclasses

import numpy as np

from s2d_jax.sampling import cache as cache_lib
from s2d_jax.sampling.cache import bucket, length_bucket, quarter_octave


@dataclasses.dataclass
class Request:
    """Samples `first .. first + count - 1` of prompt `prompt` (token ids `ids`), drawn with `keys`, each of at
    most `budget` new tokens."""

    prompt: int
    ids: list[int]
    first: int
    count: int
    keys: np.ndarray  # [count] key data
    budget: int
    prefix: int = 0  # leading tokens other prompts may share (prefilled once for all of them); 0: none


def prefill_len(sampler, group: list[Request]) -> int:
    """Cache slots a prefill of `group` fills: the prompt bucket (within the context, room left for the budgets),
    or for shared prefixes the prefix bucket plus the suffix bucket."""
    if group[0].prefix:
        return sum(_shared_widths(sampler, group))
    longest = max(len(q.ids) for q in group)
    return max(min(length_bucket(longest, sampler.min_prompt_bucket), _room(sampler, group)), longest)


def _room(sampler, group: list[Request]) -> int:
    return sampler.model.cfg.max_position_embeddings - max(q.budget for q in group)


def _shared_widths(sampler, group: list[Request]) -> tuple[int, int]:
    """Prefix and suffix widths of a shared-prefix prefill: buckets, kept within the context (less the budgets)
    where they fit, as a plain prefill's are (a width past it would make every decode width a new shape)."""
    room = _room(sampler, group)
    prefix, suffix = max(q.prefix for q in group), max(len(q.ids) - q.prefix for q in group)
    s = quarter_octave(suffix, 16)
    p = max(min(length_bucket(prefix, sampler.min_prompt_bucket), room - s), prefix)
    return p, max(min(s, room - p), suffix)


def chunks(sampler, group: list[Request], multiple: int) -> list[tuple[list[Request], int]]:
    """`group` (longest prompts first) in prefills of `(requests, padded rows)`: `cache.row_chunks` rows, and a
    chunk halved where its shorter half would otherwise pad to its longest prompt, when that saves at least an
    eighth of the positions prefilled (BSM's solve prompts run 700-1,500 tokens)."""
    if not group:
        return []
    num = cache_lib.row_chunks(len(group), multiple)[0]
    whole = [(group[:num], num)] + chunks(sampler, group[num:], multiple)
    half = num // 2
    if half % multiple or half < multiple or len(group) <= half:
        return whole
    split = [(group[:half], half)] + chunks(sampler, group[half:], multiple)
    cost = lambda plan: sum(rows * prefill_len(sampler, part) for part, rows in plan)
    return split if cost(split) <= 0.875 * cost(whole) else whole


def _padded(sampler, rows: list[list[int]], width: int, left: bool, first: int = 0, num: int | None = None):
    """`rows` padded to `width` columns (on the left or right) as tokens, positions (from `first[r]`) and segments,
    and to `num` rows (default: a power of two that divides over the mesh's data axes; fillers: one dummy token)."""
    if num is None:
        num = bucket(len(rows), 1)
        while num % sampler.row_multiple:
            num += 1
    tokens = np.full((num, width), sampler.pad_id, np.int32)
    positions, segments = np.zeros((num, width), np.int32), np.zeros((num, width), np.int32)
    first = np.broadcast_to(first, (len(rows),))
    for r, row in enumerate(rows):
        at = slice(width - len(row), width) if left else slice(0, len(row))
        tokens[r, at], positions[r, at], segments[r, at] = row, first[r] + np.arange(len(row)), 1
    segments[len(rows):, -1 if left else 0] = 1
    sampler.prefill_tokens += sum(map(len, rows))
    sampler.prefill_padded += num * width
    return tuple(map(sampler._put, (tokens, positions, segments)))


def prefill(sampler, group: list[Request], p_len: int, num: int):
    """Logits and a cache of the prompt's slots for `group` (left-padded to `p_len`, `num` rows)."""
    sampler.prefill_rows += len(group)
    tokens = _padded(sampler, [q.ids for q in group], p_len, True, num=num)
    return cache_lib.prefill(sampler.graphdef, sampler.state, *tokens, max_len=p_len, dtype=str(sampler.cache_dtype))


def prefill_shared(sampler, group: list[Request], p_len: int):
    """Logits and a cache of `p_len` slots for `group`, each distinct prefix prefilled once (cache.prefill_shared)."""
    heads: dict[tuple, int] = {}
    owner = [heads.setdefault(tuple(q.ids[:q.prefix]), len(heads)) for q in group]
    p_width = _shared_widths(sampler, group)[0]
    prefix = _padded(sampler, [list(h) for h in heads], p_width, True)
    suffix = _padded(sampler, [q.ids[q.prefix:] for q in group], p_len - p_width, False, [q.prefix for q in group])
    num = suffix[0].shape[0]
    owner = np.pad(owner, (0, num - len(group)))
    last = np.array([len(q.ids) - q.prefix - 1 for q in group] + [0] * (num - len(group)), np.int32)
    sampler.prefill_rows += len(heads)
    return cache_lib.prefill_shared(sampler.graphdef, sampler.state, *prefix, sampler._put(owner), *suffix,
                                    sampler._put(last), dtype=str(sampler.cache_dtype))
