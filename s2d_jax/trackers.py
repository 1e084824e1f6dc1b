"""Where a run's metrics go besides its artifacts: `report.trackers` (TensorBoard, Weights & Biases) and, always,
`tracking.jsonl` in the workdir. One session per command (`session`), on process 0 only; stages call `log` with
their summaries and the trainer with its rows, under stable names (`train/loss`, `generate/tokens_per_s`,
`filter/kept_fraction`, `eval/distilled/accuracy`, `rounds/routed_accuracy`, ...; docs/tracking.md lists them).

A tracker that fails (the network gone, its service killed) never stops the run: one warning, it is dropped, and
the local metrics go on. A resumed command continues the same W&B run (its id is kept in the workdir)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time

from ml_collections import ConfigDict

from s2d_jax.runtime import distributed, faults
from s2d_jax.artifacts import write_atomic, writing
from s2d_jax.errors import S2DError

_log = logging.getLogger("s2d")

TRACKERS = ("tensorboard", "wandb")
LOCAL = "tracking.jsonl"  # every metric any tracker got, one JSON row per call
RUN_ID = "wandb_run.json"  # the W&B run this workdir continues
SKIP = ("answers", "meta", "share_histogram", "sweep")  # not metrics: histograms of answers, descriptions, curves

_current: Session | None = None


def check(config: ConfigDict) -> None:
    """One line for a tracker that cannot run here (before anything is written)."""
    if "wandb" not in config.report.trackers:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise S2DError("config key 'report.trackers': 'wandb' needs the wandb package (pip install "
                       "'s2d-jax[wandb]', or drop it from report.trackers)") from None


@contextlib.contextmanager
def session(config: ConfigDict, workdir: str, stage: str, on: bool = True):
    """The trackers of one command over `workdir` (the root of its rounds); closed, with the report's artifacts
    sent, when the command ends. Off (`s2d plan`, other hosts): none."""
    global _current
    _current = Session(config, workdir, stage) if on and distributed.primary() else None
    try:
        yield _current
    finally:
        if _current is not None:
            _current.close()
        _current = None


def log(workdir: str, prefix: str, metrics: dict, step: int | None = None, round: int | None = None) -> None:
    """Send `metrics` (nested dicts flattened to `prefix/a/b`; numbers only) to the open session's trackers;
    `workdir` says which round they belong to (or `round`). Without a session (library use, other hosts):
    nothing."""
    if _current is not None:
        _current.log(workdir, prefix, metrics, step, round)


def flatten(metrics: dict, prefix: str) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if key in SKIP:
            continue
        if isinstance(value, dict):
            out.update(flatten(value, name))
        elif isinstance(value, (bool, int, float)) and math.isfinite(value):
            out[name] = float(value)
    return out


class Session:
    def __init__(self, config: ConfigDict, workdir: str, stage: str):
        self.workdir, self.stage = workdir, stage
        self.local = os.path.join(workdir, LOCAL)
        self.trackers = {}
        for name in config.report.trackers:
            self._guard(name, lambda: self.trackers.__setitem__(name, OPEN[name](config, workdir)))

    def log(self, workdir: str, prefix: str, metrics: dict, step: int | None, round: int | None) -> None:
        flat = flatten(metrics, prefix)
        if not flat:
            return
        r = round or self._round(workdir)
        row = {"time": time.time(), "stage": self.stage, "round": r, **({"step": step} if step is not None else {}),
               **flat}
        with writing(self.local), open(self.local, "a") as f:
            f.write(json.dumps(row) + "\n")
        for name, tracker in list(self.trackers.items()):
            self._guard(name, lambda: tracker.log(prefix, flat, r, step))
        faults.point("tracker-log")

    def close(self) -> None:
        for name, tracker in list(self.trackers.items()):
            self._guard(name, lambda: tracker.close(self.workdir))

    def _guard(self, name: str, call) -> None:
        """Run a tracker's call; when it fails, warn once and drop the tracker (training goes on)."""
        try:
            call()
        except Exception as e:  # noqa: BLE001 (any failure of a third-party tracker: network, service, disk)
            self.trackers.pop(name, None)
            _log.warning("tracker %s failed (%s: %s); dropped for the rest of this command, metrics go on in %s",
                        name, type(e).__name__, (str(e).splitlines() or [""])[0][:200], self.local)
            with contextlib.suppress(Exception):
                CLOSE_FAILED.get(name, lambda: None)()

    def _round(self, workdir: str) -> int:
        """The round `workdir` is: R for ROOT/rounds/R, else 1."""
        found = re.fullmatch(r"rounds/(\d+)", os.path.relpath(workdir, self.workdir).replace(os.sep, "/"))
        return int(found.group(1)) if found else 1


def _summary_writer(logdir: str):
    """tensorboardX's writer. It imports PyTorch where installed, only to accept torch tensors; we log floats, and
    a stage process would pay seconds for it, so unless PyTorch is already loaded it is hidden while tensorboardX
    loads (its import is guarded: without PyTorch it takes numpy arrays)."""
    import sys

    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(logdir)


class TensorBoard:
    """Scalars under the same names, at the step given (a training step, else the round)."""

    def __init__(self, config: ConfigDict, workdir: str):
        self.logdir, self.writer = os.path.join(workdir, "tensorboard"), None

    def log(self, prefix: str, flat: dict, r: int, step: int | None) -> None:
        if self.writer is None:  # made at the first metric: a command that logs none leaves no event file
            self.writer = _summary_writer(self.logdir)
        for key, value in flat.items():
            self.writer.add_scalar(key, value, r if step is None else step)
        self.writer.flush()

    def close(self, workdir: str) -> None:
        if self.writer is not None:
            self.writer.close()


class WandB:
    """A W&B run per workdir (resumed by id), with the resolved config; training rows against their step
    (`train/step`, `pretrain/step`), stage summaries against `round`; at the end `report.png`, `report.md` and `eval.json` as an artifact and the eval
    table as a W&B table."""

    def __init__(self, config: ConfigDict, workdir: str):
        import wandb

        w = config.report.wandb
        path = os.path.join(workdir, RUN_ID)
        kept = json.load(open(path))["id"] if os.path.exists(path) else None
        self.run = wandb.init(project=w.project, entity=w.entity or None, name=w.name or os.path.basename(
            os.path.abspath(workdir)), tags=list(w.tags), group=w.group or None, mode=w.mode, dir=workdir,
            id=kept, resume="allow", config=config.to_dict(),
            settings=wandb.Settings(console="off", quiet=True, silent=True))
        if kept is None:
            write_atomic(path, json.dumps({"id": self.run.id}) + "\n")
        self.run.define_metric("round", hidden=True)
        self.axes: set[str] = set()

    def log(self, prefix: str, flat: dict, r: int, step: int | None) -> None:
        axis = "round" if step is None else f"{prefix}/step"
        if prefix not in self.axes:  # each prefix's metrics plot against their own x axis
            self.axes.add(prefix)
            if axis != "round":
                self.run.define_metric(axis, hidden=True)
            self.run.define_metric(f"{prefix}/*", step_metric=axis)
        self.run.log({**flat, "round": r, **({axis: step} if step is not None else {})})

    def close(self, workdir: str) -> None:
        import wandb

        files = [f for f in ("report.png", "report.md", "eval.json", "rounds.png", "rounds.json")
                 if os.path.exists(os.path.join(workdir, f))]
        if files:
            art = wandb.Artifact(f"report-{self.run.id}", type="report")
            for f in files:
                art.add_file(os.path.join(workdir, f))
            self.run.log_artifact(art)
        if os.path.exists(os.path.join(workdir, "eval.json")):
            self.run.log({"eval/table": eval_table(json.load(open(os.path.join(workdir, "eval.json"))))})
        self.run.finish()


def eval_table(results: dict):
    """eval.json's systems as a W&B table: one row per system."""
    import wandb

    columns = ["system", "accuracy", "generated_tokens", "flops", "seconds"]
    rows = [[name, *(r.get(c) for c in columns[1:])] for name, r in results.items()
            if isinstance(r, dict) and {"accuracy", "generated_tokens"} <= set(r)]  # systems, not train or filter
    return wandb.Table(columns=columns, data=rows)


def _wandb_teardown() -> None:
    import wandb

    wandb.teardown()


OPEN = {"tensorboard": TensorBoard, "wandb": WandB}
CLOSE_FAILED = {"wandb": _wandb_teardown}  # after a failure: stop its service quietly, so exit is clean
