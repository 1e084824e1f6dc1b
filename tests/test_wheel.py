"""The package as a user installs it: a wheel built from the source (not an editable install), installed into a
fresh virtualenv that borrows the test venv's dependencies, run from a directory that is not the checkout."""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

REPO = pathlib.Path(__file__).resolve().parent.parent


def _run(cmd, **kw):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def test_the_wheel_works_outside_the_checkout(tmp_path):
    src = tmp_path / "src"  # a copy, so the build writes nothing into the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                            "__pycache__", ".pytest_cache"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
          src])
    (wheel,) = (tmp_path / "dist").glob("s2d_jax-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = pathlib.Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    # the test venv's packages as a plain path: its .pth files (the editable s2d_jax among them) are not processed
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda *cmd: _run(cmd, cwd=elsewhere, env=env)
    where = run(python, "-c", "import s2d_jax; print(s2d_jax.__file__)")
    assert where.startswith(str(site)), where  # the installed wheel, not the checkout
    # every file read at run time is package data: the registry, the paper's table, the name lists
    run(python, "-c", "from s2d_jax.report import paper_rows; from s2d_jax.system2.tasks.base import first_names; "
                      "assert paper_rows()['coin_flip']['distilled'][1] == '75.7 (unverified)'; "
                      "assert len(first_names()[0]) > 4000")
    listing = run(venv / "bin" / "s2d", "data", "list")
    assert listing.startswith("name") and "mt_bench" in listing and "oasst2" in listing
    config = shutil.copy(REPO / "configs" / "rar2_last_letters.py", elsewhere / "letters.py")
    printed = run(venv / "bin" / "s2d", "plan", "--config", config, "--config.model.path=",
                  "--config.model.preset=llama3-8b", "--config.plan.devices=8", "--workdir", elsewhere / "plan")
    assert (elsewhere / "plan" / "plan.json").exists() and "per device" in printed.lower()
