"""Stage `run`: every stage in order, each skipped when its artifact is complete; with `loop.rounds` > 1, round
after round in WORKDIR/rounds/R/, then the rounds' report (the workdir's guards, its lock and kept config, are
taken by the command line: `s2d_jax.workdir.claim`)."""

from __future__ import annotations

import json
import logging
import os

from ml_collections import ConfigDict

from s2d_jax.runtime import distributed, stopping
from s2d_jax.relegation import rounds
from s2d_jax.artifacts import read_jsonl, write_atomic
from s2d_jax.build import toy_base
from s2d_jax.stages.eval import evaluate_stage
from s2d_jax.stages.filter import filter
from s2d_jax.stages.generate import generate
from s2d_jax.stages.inputs import check_rounds
from s2d_jax.stages.pretrain import pretrain
from s2d_jax.stages.probe import train_probe
from s2d_jax.stages.route import route
from s2d_jax.stages.train import nothing_to_train, train

log = logging.getLogger("s2d")


def run(config: ConfigDict, workdir: str) -> str:
    """Stage `run`: [pretrain ->] [route ->] generate -> filter -> train [-> probe] -> eval, skipping each stage
    whose artifact is complete, so a killed run reruns from where it stopped; with `loop.rounds` > 1 those stages
    once per round (`run_rounds`)."""
    if toy_base(config, workdir):
        pretrain(config, workdir)
        stopping.check("after pretrain")
    if rounds.in_rounds(config):
        return run_rounds(config, workdir)
    _stages(config, workdir)
    return os.path.join(workdir, "report.md")


def _stages(config: ConfigDict, workdir: str) -> None:
    for name, stage in (("route", route), ("generate", generate), ("filter", filter), ("pool", _pool),
                        ("train", train), ("probe", train_probe), ("eval", evaluate_stage)):
        if stage is train and nothing_to_train(config, workdir):
            log.warning("the filter kept no input: skipping train; the report says so")
            continue
        stage(config, workdir)
        stopping.check(f"after {name}")


def run_rounds(config: ConfigDict, workdir: str) -> str:
    """Relegation, round after round: round R's pool is the R-th slice of the unlabelled inputs (new inputs arrive
    as the system learns: `loop.round_size` of them per round, or the pool cut into `loop.rounds` slices); its
    System 1, which answers what it is confident on and escalates the rest to System 2, is round R-1's distilled
    model. A rerun resumes at the first incomplete stage of the first incomplete round, and with more rounds over a
    stream that grew, goes on after the last. Then `rounds.json`, `report.md` and `rounds.png` in the workdir."""
    from s2d_jax.relegation.report import write_rounds_report

    total, count = check_rounds(config), config.loop.rounds
    for r in range(1, count + 1):
        where = rounds.round_dir(workdir, r)
        if distributed.primary():
            os.makedirs(where, exist_ok=True)
            if rounds.info(where) is None:
                last = _last_model(workdir, r)
                rounds.write_info(where, r, count, system1=last, init=last if config.loop.init == "previous" else "")
        distributed.barrier(f"round {r} of {workdir}")
        log.info("round %d of %d (System 1: %s)", r, count, (rounds.info(where) or {}).get("system1") or "base")
        _stages(round_config(config, r, total), where)
    return write_rounds_report(config, workdir)


def round_config(config: ConfigDict, r: int, total: int) -> ConfigDict:
    """Round r's config: its slice of the inputs (`task.offset`, `task.n`), and its own checkpoint directory when
    one is configured (a round's checkpoints never resume another's)."""
    out = ConfigDict(config.to_dict())
    size = config.loop.round_size
    start, end = ((r - 1) * size, r * size) if size else \
        ((r - 1) * total // config.loop.rounds, r * total // config.loop.rounds)
    out.task.offset, out.task.n = config.task.offset + start, end - start
    if config.train.checkpoint_dir:
        out.train.checkpoint_dir = config.train.checkpoint_dir.rstrip("/") + f"/rounds/{r}"
    out.lock()
    return out


def _last_model(workdir: str, r: int) -> str:
    """The latest distilled model of rounds before r (relative to the workdir), "" = none: the base."""
    for k in range(r - 1, 0, -1):
        if os.path.exists(os.path.join(rounds.round_dir(workdir, k), "model")):
            return os.path.join("rounds", str(k), "model")
    return ""


def _pool(config: ConfigDict, workdir: str) -> None:
    """In a round with `loop.accumulate`: `train.jsonl`, every round's kept examples so far (an input kept in
    several rounds once, as its latest round kept it), what `train` fine-tunes on."""
    info = rounds.info(workdir)
    out = os.path.join(workdir, "train.jsonl")
    if not info or not config.loop.accumulate or os.path.exists(out):
        return
    kept: dict[str, dict] = {}
    for r in range(1, info["round"] + 1):
        path = os.path.join(rounds.round_dir(rounds.root(workdir), r), "distill.jsonl")
        for row in read_jsonl(path, ("id", "prompt", "target"), empty_ok=True):
            kept.pop(row["id"], None)
            kept[row["id"]] = row
    if distributed.primary():
        write_atomic(out, "".join(json.dumps(row) + "\n" for row in kept.values()))
    distributed.barrier(f"pool {workdir}")
    log.info("round %d trains on %d kept examples (this round's and earlier rounds')", info["round"], len(kept))
