"""The rules a config value obeys, as the schema in `config_schema.py` writes them: `_(default, rule)`, where a rule
returns None for an allowed value and else says what is allowed (`at_least(1)(0)` -> ">= 1")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class _(NamedTuple):
    """A schema entry with a rule: `check(value)` returns None when the value is allowed, else what is."""

    default: Any
    check: Callable[[Any], str | None]


def at_least(low):
    return lambda v: None if v >= low else f">= {low}"


def above(low):
    return lambda v: None if v > low else f"> {low}"


def between(low, high, low_open=False, high_open=False):
    def check(v):
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        return None if ok else f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return check


def one_of(*choices):
    return lambda v: None if v in choices else "one of " + ", ".join(repr(c) for c in choices)


def each_of(*choices):
    """A tuple whose every item is one of `choices` (each at most once)."""
    def check(v):
        ok = isinstance(v, (tuple, list)) and all(x in choices for x in v) and len(set(v)) == len(v)
        return None if ok else "a tuple of distinct names among " + ", ".join(repr(c) for c in choices)
    return check


def mesh_size(auto: bool = False):
    """-1 (all remaining devices) or >= 1; with `auto`, 0 too (the generation mesh: chosen for decoding)."""
    if auto:
        return lambda v: None if v >= -1 else "0 (all three: chosen for decoding), -1 (all remaining devices) or >= 1"
    return lambda v: None if v == -1 or v >= 1 else "-1 (all remaining devices) or >= 1"
