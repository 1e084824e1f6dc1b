"""Faults: two `s2d` on one workdir, a lock left by a killed process, and writes that fail (a file-size limit, as a
full disk gives) for rollouts, checkpoints and exports. Each leaves complete artifacts intact, nothing partial that
looks complete and one clear line, and a rerun resumes to what an uninterrupted run gives."""

import json
import os
import subprocess
import sys
import time

import pytest

from s2d_jax.cli import main
from s2d_jax.model import load_model

FAST = ["pretrain.steps=0", "program.name=rar2", "program.max_new_tokens=24", "task.size=3"]
TINY = ["--config", "configs/tiny.py", *(f"--config.{o}" for o in FAST)]


# Sets a file-size limit (as a full disk: writes past it fail with EFBIG; SIGXFSZ ignored so they fail rather than
# kill) in a fresh interpreter, then becomes `s2d` (no fork of this multithreaded process with Python in between).
LIMITED = ("import os, resource, signal, sys; n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n));"
           " signal.signal(signal.SIGXFSZ, signal.SIG_IGN); os.execv(sys.executable, [sys.executable] + sys.argv[2:])")


def _spawn(stage, workdir, *extra, fault=None, file_limit=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if fault:
        env["S2D_FAULT"] = fault
    command = ["-m", "s2d_jax.cli", stage, *TINY, "--workdir", str(workdir), *extra]
    if file_limit:
        command = ["-c", LIMITED, str(file_limit), *command]
    return subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("s2d:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ref")
    assert main(["generate", *TINY, "--workdir", str(workdir)]) == 0
    return (workdir / "rollouts.jsonl").read_text()


def test_a_second_s2d_is_refused_naming_the_holder_whose_lock_is_taken_over_once_it_is_dead(reference, tmp_path,
                                                                                            capsys, caplog):
    proc = _spawn("generate", tmp_path, "--config.generate.chunk=2", fault="rollout-chunk:1:SIGSTOP")
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "rollouts.jsonl.partial").exists():
        time.sleep(0.1)
    try:  # the first holds the workdir, stopped after its first chunk of rollouts
        capsys.readouterr()
        code = main(["filter", *TINY, "--workdir", str(tmp_path)])
        err = capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert code == 2 and f"in use by s2d pid {proc.pid} on host" in _one_line(err)
    assert not (tmp_path / "rollouts.jsonl").exists()
    assert main(["generate", *TINY, "--workdir", str(tmp_path)]) == 0  # the killed holder's lock is taken over
    assert f"taking over the lock of s2d pid {proc.pid}" in caplog.text
    assert (tmp_path / "rollouts.jsonl").read_text() == reference  # and its rollouts resumed


def test_rollouts_on_a_full_disk(reference, tmp_path):
    proc = _spawn("generate", tmp_path, file_limit=6000)  # the kept config fits, the rollouts do not
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    line = _one_line(err)
    assert "rollouts.jsonl.partial: write failed (File too large)" in line and "a rerun resumes" in line
    assert not (tmp_path / "rollouts.jsonl").exists()
    assert main(["generate", *TINY, "--workdir", str(tmp_path)]) == 0  # space is back
    assert (tmp_path / "rollouts.jsonl").read_text() == reference


def _pairs(workdir):
    from s2d_jax.system2.tasks import get_task

    with open(workdir / "pairs.jsonl", "w") as f:
        for e in get_task("last_letters").generate(12, seed=5, num_words=3):
            f.write(json.dumps({"id": e.id, "prompt": e.input, "target": e.label}) + "\n")
    return [f"--config.train.data={workdir / 'pairs.jsonl'}", "--config.train.steps=6",
            "--config.train.checkpoint_every=2"]


def test_checkpoints_on_a_full_disk(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    args = _pairs(full)
    proc = _spawn("train", full, *args, file_limit=60_000)  # metrics fit, a checkpoint's arrays do not
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "checkpoints: checkpoint save failed" in _one_line(err) and "File too large" in err
    assert not (full / "model").exists()
    assert all(name.endswith("orbax-checkpoint-tmp") for name in os.listdir(full / "checkpoints"))  # none complete
    assert main(["train", *TINY, "--workdir", str(full), *args]) == 0  # space is back: it trains to the end
    steps = [json.loads(line)["step"] for line in open(full / "metrics.jsonl")]
    assert steps == [2, 4, 6] and load_model(str(full / "model")).cfg.num_layers == 2


def test_an_export_on_a_full_disk(tmp_path):
    proc = _spawn("convert", tmp_path, "--config.tokenizer=bytes", file_limit=60_000)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert f"{tmp_path / 'converted'}: write failed (File too large)" in _one_line(err)
    assert not (tmp_path / "converted").exists() and not [n for n in os.listdir(tmp_path) if "converted" in n]
    assert main(["convert", *TINY, "--workdir", str(tmp_path), "--config.tokenizer=bytes"]) == 0
    assert load_model(str(tmp_path / "converted")).cfg.num_layers == 2


# ------------------------------------------------------------------------------------------ signals on every stage


@pytest.mark.parametrize("fault, code, says", [
    ("rollout-chunk:1:SIGTERM", 143, "s2d: stopped by SIGTERM after 2 of 6 inputs; rerun to resume"),  # chunk kept
    ("decode-chunk:2:SIGINT", 130, "s2d: stopped by SIGINT after 0 of 6 inputs; rerun to resume"),  # chunk dropped
])
def test_a_signal_mid_generate_stops_cleanly_and_resumes(reference, tmp_path, fault, code, says):
    proc = _spawn("generate", tmp_path, "--config.generate.chunk=2", fault=fault)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code and _one_line(err) == says, err
    partial = tmp_path / "rollouts.jsonl.partial"
    kept = partial.read_text().splitlines() if partial.exists() else []
    assert not (tmp_path / "rollouts.jsonl").exists() and len(kept) == (8 if code == 143 else 0)
    assert main(["generate", *TINY, "--workdir", str(tmp_path)]) == 0
    assert (tmp_path / "rollouts.jsonl").read_text() == reference


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A complete tiny run (every stage's artifact)."""
    workdir = tmp_path_factory.mktemp("run")
    assert main(["run", *TINY, "--workdir", str(workdir)]) == 0
    return workdir


def _copy_until(finished, tmp_path, *stages_undone):
    import shutil

    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    for name in stages_undone:
        path = tmp_path / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def test_a_signal_mid_filter_lets_it_finish_and_says_so(finished, tmp_path):
    _copy_until(finished, tmp_path, "distill.jsonl", "filter_report.json")
    proc = _spawn("filter", tmp_path, fault="filter:1:SIGTERM")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert _one_line(err) == ("s2d: stopped by SIGTERM as `filter` completed; its artifacts are complete; rerun to "
                              "resume")
    assert (tmp_path / "distill.jsonl").read_text() == (finished / "distill.jsonl").read_text()


def test_a_signal_mid_eval_drops_it_and_a_rerun_evaluates_alike(finished, tmp_path):
    _copy_until(finished, tmp_path, "eval.json", "report.md", "report.png")
    proc = _spawn("eval", tmp_path, fault="decode-chunk:2:SIGTERM")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert _one_line(err) == ("s2d: stopped by SIGTERM during `eval` (its unfinished part is dropped); rerun to "
                              "resume")
    assert not (tmp_path / "eval.json").exists()
    assert main(["eval", *TINY, "--workdir", str(tmp_path)]) == 0
    untimed = lambda path: {system: {k: v for k, v in row.items() if "seconds" not in k}
                            for system, row in json.load(open(path)).items() if isinstance(row, dict)}
    assert untimed(tmp_path / "eval.json") == untimed(finished / "eval.json")


# ------------------------------------------------------------------------------------------ out of memory


def test_a_config_that_cannot_fit_is_refused_before_any_work(tmp_path, capsys):
    """The issue's example: the smollm2-135m shape at 16,384 rows x 1,024 tokens per step."""
    assert main(["train", *TINY, "--workdir", str(tmp_path), "--config.model.preset=smollm2-135m",
                 "--config.train.batch_size=16384", "--config.train.max_len=1024"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("s2d: error: train needs ") and " GB per device by `s2d plan`, and the " in line
    assert "set train.remat=full" in line and "train.lora_rank > 0" in line
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_xla_running_out_of_memory_names_the_program_its_shapes_and_the_plans_advice():
    import jax
    import jax.numpy as jnp

    from s2d_jax.plan import estimate as plan
    from s2d_jax.runtime import memory
    from s2d_jax.config import load_config

    with pytest.raises(memory.OutOfMemory) as e:
        with memory.program("decode", lambda: "64 slots x 4096 cache positions, 16 steps"):
            jax.block_until_ready(jax.jit(lambda: jnp.ones((1 << 37,), jnp.float32))())  # 512 GiB
    assert str(e.value).startswith("out of device memory in the decode (64 slots x 4096 cache positions, 16 steps): "
                                   "RESOURCE_EXHAUSTED")
    config = load_config("configs/tiny.py", ["mesh.data=-1"])
    line = plan.explain(config, e.value)
    assert "`s2d plan` for this config on 8 devices: generate needs " in line and "lower generate.max_batch" in line
    with pytest.raises(memory.OutOfMemory, match=r"^out of host memory in the train step \(rows\): "):
        with memory.program("train step", lambda: "rows"):
            raise MemoryError("Unable to allocate 64.0 MiB for an array")
