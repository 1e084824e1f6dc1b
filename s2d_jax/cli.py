"""The `s2d` command: `s2d STAGE --config configs/NAME.py [--config.KEY=VALUE ...] [--workdir DIR]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from s2d_jax.errors import S2DError

USAGE = ("s2d STAGE --config configs/NAME.py [--config.KEY=VALUE ...] [--workdir DIR] "
         "[--coordinator_address HOST:PORT --num_processes N --process_id I | --distributed]")


def _parser(stages) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="s2d", usage=USAGE,
        description="System 2 distillation in JAX. Stages: " + ", ".join(stages) + ".",
        epilog="Any config key can be overridden: --config.model.path=/models/llama --config.seed=1. "
               "Keys and defaults: s2d_jax/config.py.")
    p.add_argument("stage", choices=list(stages), help="what to run")
    p.add_argument("--config", required=True, help="experiment config file (a .py with get_config())")
    p.add_argument("--workdir", default=None, help="where artifacts go (default: runs/<config name>)")
    hosts = p.add_argument_group("multi-host (run the same command on every host)")
    hosts.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0's coordinator")
    hosts.add_argument("--num_processes", type=int, default=None, help="how many processes form the cluster")
    hosts.add_argument("--process_id", type=int, default=None, help="this process's index, 0..num_processes-1")
    hosts.add_argument("--distributed", action="store_true",
                       help="let JAX detect the cluster (Cloud TPU pod slice, Slurm, Open MPI); automatic in a "
                            "multi-task srun step")
    return p


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for chatty in ("jax", "absl"):  # not the TPU-probe and per-file checkpoint chatter
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from s2d_jax.stages import STAGES  # --help must list the stages
    from s2d_jax.train import Preempted

    parser = _parser(STAGES)
    args, rest = parser.parse_known_args(argv)
    overrides, unknown = _split_overrides(rest)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        from s2d_jax import distributed
        from s2d_jax.config import load_config

        if distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                                  auto=args.distributed) and not distributed.primary():
            logging.getLogger("s2d").setLevel(logging.WARNING)  # one host narrates

        config = load_config(args.config, overrides)
        workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
        os.makedirs(workdir, exist_ok=True)
        STAGES[args.stage](config, workdir)
    except Preempted as e:
        print(f"s2d: {e}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a scheduler expects of a preempted job
    except S2DError as e:
        print(f"s2d: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("s2d: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
