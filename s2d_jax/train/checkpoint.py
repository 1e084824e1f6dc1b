"""Orbax checkpoints of a training run: parameters, optimizer state, step, rng and the data iterator's state.

Saves are asynchronous (the device-to-host copy blocks, the write does not) and finalised by an atomic rename, so
an interrupted save never looks complete. Restoring walks back from the latest step: a checkpoint that cannot be
read is reported, moved aside to `<dir>.corrupt/` (so a later save of the same step does not collide with it) and
the previous one is used. Arrays are restored onto whatever shardings the caller asks for, so a run may resume on
another mesh or host count. The directory may be local or a `gs://` path (Orbax and etils.epath write it); on
several hosts every host saves its own shards into the same directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import orbax.checkpoint as ocp
from etils import epath

from s2d_jax.runtime import distributed
from s2d_jax.errors import S2DError

log = logging.getLogger("s2d.checkpoint")


def latest_step(directory: str) -> int | None:
    """The last finalised step in a checkpoint directory (local or gs://), without opening a manager; None if none."""
    path = epath.Path(directory)
    if not path.exists():
        return None
    steps = [int(p.name) for p in path.iterdir() if p.name.isdigit()]  # unfinished saves carry a temporary suffix
    return max(steps, default=None)


class Checkpoints:
    def __init__(self, directory: str, keep: int = 3, use_async: bool = True):
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                                     create=True)
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "data", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict, force: bool = False) -> bool:
        """Start saving `state` (a pytree of arrays), the data iterator's `data_state` and `meta` (JSON)."""
        with self._failing():
            return self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta)), force=force)

    @contextlib.contextmanager
    def _failing(self):
        """A save that fails (disk full, file too large, no permission) as one error: the partial save stays
        under Orbax's temporary name, which no restore reads, and the complete checkpoints before it are kept."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 (Orbax and tensorstore raise ValueError and others for I/O)
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise S2DError(f"{self.directory}: checkpoint save failed ({reason}); the complete checkpoints are kept, and a "
                           f"rerun resumes from the last of them") from None

    def restore_latest(self, abstract_state):
        """`(step, state, data_state, meta)` of the newest readable checkpoint, or None when there is none.
        `abstract_state` gives the tree, dtypes and target shardings (`jax.ShapeDtypeStruct`s)."""
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 (any failure to read means: use the previous one)
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                log.warning("checkpoint %s/%d is unreadable (%s); moving it aside and using the previous one",
                            self.directory, step, reason)
                self._set_aside(step)
                continue
            return step, out["state"], out["data"], out["meta"]
        return None

    def _set_aside(self, step: int) -> None:
        if distributed.primary():
            aside = epath.Path(self.directory + ".corrupt") / f"{step}-{int(time.time())}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            (epath.Path(self.directory) / str(step)).rename(aside)
        distributed.barrier(f"set aside {self.directory}/{step}")
        self.manager.close()
        self.manager = self._open()

    def wait(self) -> None:
        with self._failing():
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
