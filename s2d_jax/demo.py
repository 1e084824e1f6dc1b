"""`make demo`: the whole System 2 distillation loop on CPU in minutes, with `configs/demo.py`.

Pretrains the toy base model, runs chain-of-thought rollouts on unlabelled 4-word lists, keeps the majority-voted
answers, distils them into direct answers, evaluates System 1, System 2 and the distilled System 1 on held-out
lists, and prints the report. Everything lands in `runs/demo/` (rerunning skips what is complete).

    python -m s2d_jax.demo [--workdir runs/demo] [--config.KEY=VALUE ...]
"""

from __future__ import annotations

import os
import sys

from s2d_jax.cli import main as s2d

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    workdir = "runs/demo"
    if "--workdir" in argv:
        workdir = argv[argv.index("--workdir") + 1]
    else:
        argv += ["--workdir", workdir]
    code = s2d(["run", "--config", os.path.normpath(CONFIG), *argv])
    if code == 0:
        with open(os.path.join(workdir, "report.md")) as f:
            print("\n" + f.read())
        for name in ("report.md", "report.png", "eval.json"):
            print(f"  {os.path.join(workdir, name)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
