"""A workdir's guards: one `s2d` at a time owns it (a lock), and it keeps the config it was made with.

Every stage goes through `claim`: a second `s2d` on a workdir in use is refused naming the holder, a lock left by
a dead process is taken over (the kernel drops an `fcntl` lock with its process; the file still names the dead
holder, and we say so), and a stage run with a config that would change the workdir's results is refused naming
the first key that differs. On several hosts, host 0 holds the lock for the cluster (the others learn whether it
got it) and writes the kept config.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket

from ml_collections import ConfigDict

from s2d_jax.runtime import distributed
from s2d_jax.artifacts import write_atomic
from s2d_jax.errors import S2DError

log = logging.getLogger("s2d")

LOCK = ".s2d.lock"
KEPT = "config.json"
# Keys that say how a run is laid out, logged or checkpointed, not what it computes: a workdir may resume with
# other values (another mesh or host count, a bigger batch on device, other logging or checkpoint cadence).
FREE = ("report", "eval.harness", "mesh", "generate.mesh", "cluster", "plan", "compile", "model.attention", "model.splash_block",
        "generate.max_batch", "generate.chunk", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "train.eval_every", "train.peak_flops")
# A key that may grow on a kept workdir: training continues from its last checkpoint (the kept config is updated)
GROWS = "train.steps"
# In a workdir of rounds over a stream (`loop.round_size` > 0) these may grow: more rounds on inputs that arrived
# since (a longer generated pool, or `task.n`=0 over a file that grew); the finished rounds' slices do not move
STREAM = ("loop.rounds", "task.n")


def prepare(workdir: str) -> str:
    """Make `workdir` (one clear error when a file stands in its way or it cannot be made)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise S2DError(f"{workdir}: exists and is not a directory (--workdir names a directory)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise S2DError(f"{workdir}: cannot create the workdir ({e.strerror})") from None
    return workdir


@contextlib.contextmanager
def lock(workdir: str):
    """Hold `workdir` for this process (host 0 for a cluster) until the block ends. Every host learns whether
    host 0 got it (one all-gather), so a refusal stops them all instead of leaving some waiting."""
    if not distributed.primary():
        if distributed.agree([False])[0]:
            raise S2DError(f"{workdir}: in use by another s2d (host 0 could not take the workdir's lock)")
        yield
        return
    path = os.path.join(workdir, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder = None
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        if distributed.agree([holder is not None])[0]:
            raise S2DError(f"{workdir}: in use by {holder}; wait for it to finish, or use another --workdir")
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:
            log.warning("%s: taking over the lock of %s, which is no longer running", workdir, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"s2d pid {os.getpid()} on host {socket.gethostname()}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: nobody to take over from
    finally:
        os.close(fd)


def keep_config(config: ConfigDict, workdir: str) -> None:
    """The workdir keeps the resolved config it was made with; a stage run with one that differs in a key that
    changes results is an error (its artifacts would silently mix two experiments). `FREE` keys may change."""
    _keep(workdir, *_to_keep(config, workdir))


def _to_keep(config: ConfigDict, workdir: str) -> tuple[dict | None, str]:
    """The check of `keep_config`: (the config the workdir is to keep from now, None when it keeps its own; what
    to log when it is written)."""
    path = os.path.join(workdir, KEPT)
    current = json.loads(json.dumps(config.to_dict()))
    if not os.path.exists(path):
        return current, ""
    try:
        with open(path) as f:
            kept = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise S2DError(f"{path}: the workdir's kept config is not valid JSON ({e}); use another --workdir") from None
    kept = _with_defaults(kept)  # a key added since the workdir was made counts at its default
    key = _first_difference(_results(kept), _results(current))
    if key is None:
        return None, ""
    grows = STREAM if (_get(kept, "loop.round_size") or 0) > 0 else (GROWS,)
    grown = kept
    for k in grows:
        grown = _with(grown, k, _get(current, k))
    key = _first_difference(_results(grown), _results(current))  # a key that may not change
    if key:
        raise S2DError(f"{path}: this workdir was made with a different config (key {key!r}: {_get(kept, key)!r} "
                       f"there, {_get(current, key)!r} now); use another --workdir")
    if grows == (GROWS,) and (_get(kept, "loop.rounds") or 1) > 1:
        raise S2DError(f"{path}: {GROWS} may not change in a workdir of rounds (later rounds were routed and "
                       f"trained from earlier rounds' models); use another --workdir")
    for k in grows:
        was, now = _get(kept, k), _get(current, k)
        if now < was or (k == "task.n" and was == 0 != now):  # 0 = all of a file: nothing larger
            fewer = "to train fewer steps" if k == GROWS else "for fewer rounds"
            raise S2DError(f"{path}: {k} may only grow on a workdir ({was} there, {now} now); use another "
                           f"--workdir {fewer}")
    if grows == (GROWS,):
        return grown, f"{GROWS} grows from {_get(kept, GROWS)} to {_get(current, GROWS)}: training continues from " \
                      f"the last checkpoint"
    return grown, (f"the stream goes on: {_get(kept, 'loop.rounds')} rounds there, {_get(current, 'loop.rounds')} "
                   f"now (each of loop.round_size={_get(kept, 'loop.round_size')} new inputs); finished rounds are kept")


def _keep(workdir: str, config: dict | None, note: str) -> None:
    if note:
        log.info("%s", note)
    if config is not None and distributed.primary():
        write_atomic(os.path.join(workdir, KEPT), json.dumps(config, indent=2) + "\n")


def _with_defaults(kept: dict) -> dict:
    """`kept` with every schema key it lacks at its default."""
    from s2d_jax.config import defaults

    def merge(base: dict, over: dict) -> dict:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in over.items()}}

    return merge(json.loads(json.dumps(defaults().to_dict())), kept)


def _with(config: dict, dotted: str, value) -> dict:
    """A copy of `config` with `dotted` set to `value`."""
    out = json.loads(json.dumps(config))
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def _results(config: dict) -> dict:
    """`config` without its FREE keys."""
    out = json.loads(json.dumps(config))
    for key in FREE:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def _first_difference(a, b, prefix=""):
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = _first_difference(x, y, prefix + key + ".")
            if found:
                return found
        elif x != y:
            return prefix + key
    return None


def _get(d, dotted):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


@contextlib.contextmanager
def claim(config: ConfigDict, workdir: str, keep: bool = True, check=lambda: None):
    """What every stage runs inside: the workdir made, locked and (`keep`: every stage but `plan`, which only
    writes its own report) checked against its kept config. A round's directory (WORKDIR/rounds/R) is guarded by
    its workdir's lock and kept config: it was written by that run. `check` (the stage's preflight) runs before
    anything is written: a refused command leaves no directory it made and no kept config behind."""
    from s2d_jax.relegation import rounds

    guarded = rounds.root(workdir)
    made = _missing(guarded)
    prepare(workdir)
    started = False
    try:
        with lock(guarded):
            pending = _to_keep(config, guarded) if keep else (None, "")
            check()
            _keep(guarded, *pending)
            started = True
            yield workdir
    finally:
        if not started and distributed.primary():
            _unmake(made)


def _missing(workdir: str) -> list[str]:
    """The directories `prepare(workdir)` would make, deepest first."""
    out, path = [], os.path.abspath(workdir)
    while path and not os.path.exists(path):
        out.append(path)
        path = os.path.dirname(path)
    return out


def _unmake(made: list[str]) -> None:
    """Remove the directories a refused command made (deepest first), if they hold nothing but its lock."""
    for path in made:
        try:
            if os.path.exists(os.path.join(path, LOCK)) and os.listdir(path) == [LOCK]:
                os.remove(os.path.join(path, LOCK))
            os.rmdir(path)
        except OSError:  # something else was written there: keep it
            return
