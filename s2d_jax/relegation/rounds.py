"""The layout of a workdir run in rounds (`loop.rounds` > 1): WORKDIR/rounds/R/ holds round R's artifacts, as a
one-round workdir holds them, plus `round.json`, which says what the round starts from: its System 1 model and the
model training starts from (paths relative to the workdir; "" = the base model). Stages read it through here, so
they run alike in a round and in a plain workdir (where there is no round.json and everything is the base)."""

from __future__ import annotations

import json
import os

from s2d_jax.artifacts import write_atomic

INFO = "round.json"


def in_rounds(config) -> bool:
    """Whether a config runs in rounds (WORKDIR/rounds/R/): more than one, or rounds over a stream
    (`loop.round_size`), which may start with one and grow."""
    return config.loop.rounds > 1 or config.loop.round_size > 0


def round_dir(workdir: str, r: int) -> str:
    return os.path.join(workdir, "rounds", str(r))


def info(workdir: str) -> dict | None:
    """The round a directory is (its round.json), or None for a plain workdir."""
    path = os.path.join(workdir or ".", INFO)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def root(workdir: str | None) -> str | None:
    """The workdir a round directory belongs to (itself for a plain one): where the toy base model and the kept
    config live."""
    return os.path.normpath(os.path.join(workdir, "..", "..")) if workdir and info(workdir) else workdir


def _model(workdir: str, key: str) -> str | None:
    found = (info(workdir) or {}).get(key, "")
    return os.path.join(root(workdir), found) if found else None


def system1_path(workdir: str | None) -> str | None:
    """This round's System 1: round R-1's distilled model (the last one a round produced); None = the base."""
    return _model(workdir, "system1") if workdir else None


def init_path(workdir: str | None) -> str | None:
    """The model this round trains from (`loop.init=previous`: System 1's); None = the base."""
    return _model(workdir, "init") if workdir else None


def write_info(workdir: str, r: int, rounds: int, system1: str, init: str) -> None:
    write_atomic(os.path.join(workdir, INFO), json.dumps(
        {"round": r, "rounds": rounds, "system1": system1, "init": init}, indent=2) + "\n")
