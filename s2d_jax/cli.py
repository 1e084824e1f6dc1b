"""The `s2d` command: `s2d STAGE --config configs/NAME.py [--config.KEY=VALUE ...] [--workdir DIR]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import traceback

from s2d_jax.errors import S2DError

USAGE = ("s2d STAGE --config configs/NAME.py [--config.KEY=VALUE ...] [--workdir DIR] [--debug] [--harness TASKS] "
         "[--coordinator_address HOST:PORT --num_processes N --process_id I | --distributed]  |  "
         "s2d report WORKDIR [WORKDIR ...] [--out DIR]  |  s2d data list  |  s2d data fetch [NAME ...]")
DATA_USAGE = "s2d data list | s2d data fetch [NAME ...] (names: s2d data list; cache: $S2D_DATA)"
ERROR_LOG = "s2d-error.log"


class _BadArguments(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block and a line
        raise _BadArguments(message)


def _parser(stages) -> argparse.ArgumentParser:
    p = _Parser(
        prog="s2d", usage=USAGE,
        description="System 2 distillation in JAX. Stages: " + ", ".join(stages) + ".",
        epilog="Any config key can be overridden: --config.model.path=/models/llama --config.seed=1. "
               "Keys and defaults: s2d_jax/config_schema.py.")
    p.add_argument("stage", choices=list(stages), help="what to run")
    p.add_argument("--config", required=True, help="experiment config file (a .py with get_config())")
    p.add_argument("--workdir", default=None, help="where artifacts go (default: runs/<config name>)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    p.add_argument("--harness", default=None, metavar="TASKS",
                   help="with eval: score lm-evaluation-harness tasks (comma-separated; eval.harness.*) instead")
    hosts = p.add_argument_group("multi-host (run the same command on every host)")
    hosts.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0's coordinator")
    hosts.add_argument("--num_processes", type=int, default=None, help="how many processes form the cluster")
    hosts.add_argument("--process_id", type=int, default=None, help="this process's index, 0..num_processes-1")
    hosts.add_argument("--distributed", action="store_true",
                       help="let JAX detect the cluster (Cloud TPU pod slice, Slurm, Open MPI); automatic in a "
                            "multi-task srun step")
    return p


def _workdir(argv: list[str]) -> str:
    """WORKDIR as the command line names it, or runs/<config name> (read without importing the stages)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default="s2d")
    p.add_argument("--workdir", default=None)
    args, _ = p.parse_known_args(argv)
    return args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])


def _split_overrides(rest: list[str]) -> tuple[list[str], list[str]]:
    overrides, unknown, i = [], [], 0
    while i < len(rest):
        arg = rest[i]
        if arg.startswith("--config."):
            item = arg[len("--config."):]
            if "=" not in item and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                item, i = f"{item}={rest[i + 1]}", i + 1
            overrides.append(item)
        else:
            unknown.append(arg)
        i += 1
    return overrides, unknown


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from s2d_jax.runtime import supervise

    if supervise.wanted(argv) and argv[:1] not in (["report"], ["data"]):  # on a cluster: a lost host is one line
        return supervise.run(argv, os.path.join(_workdir(argv), ERROR_LOG))
    if os.environ.get(supervise.ENV):
        supervise.die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for chatty in ("jax", "absl"):  # not the TPU-probe and per-file checkpoint chatter
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # a failed async save is reported once, by us
    from s2d_jax.stages import STAGES  # --help must list the stages

    if argv[:1] == ["report"]:
        return _report(argv[1:])
    if argv[:1] == ["data"]:
        return _data(argv[1:])
    parser = _parser(STAGES)
    try:
        args, rest = parser.parse_known_args(argv)
        overrides, unknown = _split_overrides(rest)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.harness is not None and args.stage != "eval":
            parser.error("--harness goes with the eval stage: s2d eval --harness TASKS")
        if args.harness is not None:
            overrides.append(f"eval.harness.tasks={args.harness}")
    except _BadArguments as e:
        print(f"s2d: error: {e} (usage: {USAGE})", file=sys.stderr)
        return 2
    workdir = _workdir(argv)
    hooks = (threading.excepthook, sys.unraisablehook)
    quiet = _TracebacksToLog(workdir)
    if not args.debug:  # tracebacks of background threads and libraries' logs go to the error log, not the screen
        threading.excepthook = lambda a: _log_error(workdir, (a.exc_type, a.exc_value, a.exc_traceback))
        sys.unraisablehook = lambda u: _log_error(workdir, (u.exc_type, u.exc_value, u.exc_traceback))
        for handler in logging.getLogger().handlers:
            handler.addFilter(quiet)
    try:
        return _run(args, overrides, workdir)
    finally:
        threading.excepthook, sys.unraisablehook = hooks
        for handler in logging.getLogger().handlers:
            handler.removeFilter(quiet)


def _one_line(usage: str, body) -> int:
    """Run a command that takes no config: bad arguments and bad input are one line and exit 2."""
    try:
        body()
    except _BadArguments as e:
        print(f"s2d: error: {e} (usage: {usage})", file=sys.stderr)
        return 2
    except S2DError as e:
        print(f"s2d: error: {e}", file=sys.stderr)
        return 2
    return 0


def _report(argv: list[str]) -> int:
    """`s2d report WORKDIR ...`: the runs' eval.json side by side (and the paper's numbers) in DIR/comparison.md."""
    from s2d_jax.report import write_comparison

    def body():
        p = _Parser(prog="s2d report", usage="s2d report WORKDIR [WORKDIR ...] [--out DIR]")
        p.add_argument("workdirs", nargs="+")
        p.add_argument("--out", default=os.path.join("runs", "comparison"))
        args = p.parse_args(argv)
        md, png = write_comparison(args.workdirs, args.out)
        print(open(md).read(), end="")
        logging.getLogger("s2d").info("wrote %s, %s", md, png)

    return _one_line(USAGE, body)


def _data(argv: list[str]) -> int:
    """`s2d data list` (name, licence, size, cached) and `s2d data fetch [NAME ...]` (into $S2D_DATA)."""
    from s2d_jax import datasets

    def body():
        p = _Parser(prog="s2d data", usage=DATA_USAGE)
        p.add_argument("action", choices=["list", "fetch"])
        p.add_argument("names", nargs="*")
        args = p.parse_args(argv)
        if args.action == "list" and args.names:
            raise _BadArguments("'s2d data list' takes no names")
        if args.action == "list":
            print(datasets.table())
            return
        paths, failures = datasets.fetch(args.names)
        print("\n".join(paths))
        for line in failures:
            print(f"s2d: cannot fetch {line}", file=sys.stderr)
        if failures:
            raise S2DError(f"{len(failures)} of {len(paths) + len(failures)} data entries not fetched (one line each "
                           f"above); the others are in the cache ({datasets.data_dir()})")

    return _one_line(DATA_USAGE, body)


class _TracebacksToLog(logging.Filter):
    """A log record's traceback (Orbax logs its failed background writes with one) goes to the error log; the
    record's own line still shows."""

    def __init__(self, workdir: str):
        super().__init__()
        self.workdir = workdir

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None:
            _log_error(self.workdir, record.exc_info)
            record.exc_info, record.exc_text = None, None
        return True


def _run(args, overrides: list[str], workdir: str) -> int:
    from s2d_jax.plan import estimate as plan
    from s2d_jax.runtime import memory
    from s2d_jax.runtime import stopping, supervise
    from s2d_jax.stages import STAGES

    config = None
    try:
        from s2d_jax import trackers, workdir as workdir_lib
        from s2d_jax.runtime import compile_cache, distributed
        from s2d_jax.config import load_config
        from s2d_jax.stages.preflight import preflight

        config = load_config(args.config, overrides)
        compile_cache.enable(config.compile.cache_dir)
        if distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                                  auto=args.distributed, heartbeat_timeout=config.cluster.heartbeat_timeout_s) \
                and not distributed.primary():
            logging.getLogger("s2d").setLevel(logging.WARNING)  # one host narrates
        with workdir_lib.claim(config, workdir, keep=args.stage != "plan",
                               check=lambda: preflight(config, "harness" if args.harness else args.stage,
                                                             workdir)):
            with stopping.on_signals(), trackers.session(config, workdir, args.stage, args.stage != "plan"):
                if args.harness is not None:
                    from s2d_jax.stages.harness import harness

                    harness(config, workdir)
                else:
                    STAGES[args.stage](config, workdir)
                if (signum := stopping.received()) is not None:  # it came as the stage finished: all is complete
                    raise stopping.Stopped(signum, f"as `{args.stage}` completed; its artifacts are complete")
    except stopping.Stopped as e:  # complete artifacts and partial files are kept; 143 / 130 as schedulers expect
        where = "" if e.where else f" during `{args.stage}` (its unfinished part is dropped)"
        print(f"s2d: {e}{where}; rerun to resume", file=sys.stderr)
        return e.code
    except memory.OutOfMemory as e:
        print(f"s2d: error: {plan.explain(config, e)}", file=sys.stderr)
        return 2
    except S2DError as e:
        print(f"s2d: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("s2d: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a write that failed (disk full, file too large, permissions): nothing complete is lost
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"s2d: error: {where}{e.strerror or e}; complete artifacts are kept, and a rerun resumes",
              file=sys.stderr)
        return 2
    except Exception as e:  # a bug: one line here, the traceback in the workdir (or on screen with --debug)
        if args.debug:
            raise
        if supervise.collective_failed(e):  # a lost host: the coordination service ends this process (supervise.py)
            supervise.await_abort(_log_error(workdir), config)
        if memory.exhausted(e) and config is not None:  # where no program was named: still the plan's advice
            oom = memory.OutOfMemory(f"`{args.stage}` stage", "see the traceback in the error log", str(e)[:200],
                                     isinstance(e, MemoryError))
            print(f"s2d: error: {plan.explain(config, oom)}; details in {_log_error(workdir)}", file=sys.stderr)
            return 2
        print(f"s2d: internal error: {type(e).__name__}: {e}; details in {_log_error(workdir)}", file=sys.stderr)
        return 1
    return 0


def _log_error(workdir: str, exc_info=None) -> str:
    """Append a traceback (default: the current exception's) to WORKDIR/s2d-error.log (a temporary file if that
    fails); return where it went."""
    text = "".join(traceback.format_exception(*exc_info)) if exc_info else traceback.format_exc()
    path = os.path.join(workdir, ERROR_LOG)
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError:  # no workdir (yet), or it cannot be written
        fd, path = tempfile.mkstemp(prefix="s2d-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return path


if __name__ == "__main__":
    sys.exit(main())
