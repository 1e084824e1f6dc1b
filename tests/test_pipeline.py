"""`s2d run` end to end on configs/tiny.py: every artifact, skipping complete stages, resuming after a kill, the
kept config, and the report from a given eval.json."""

import json
import os
import signal
import subprocess
import sys

import pytest

from s2d_jax.cli import main
from s2d_jax.report import markdown, write_report

TINY = ["--config", "configs/tiny.py"]
ARTIFACTS = ("config.json", "base", "rollouts.jsonl", "distill.jsonl", "filter_report.json", "checkpoints", "model",
             "metrics.jsonl", "eval.json", "report.md", "report.png")


def _without_seconds(results):
    return {k: ({kk: vv for kk, vv in v.items() if kk not in ("seconds", "tokens_per_s", "mfu")}
                if isinstance(v, dict) else v) for k, v in results.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    assert main(["run", *TINY, "--workdir", str(workdir)]) == 0
    return workdir


def test_run_writes_every_artifact(reference):
    for name in ARTIFACTS:
        assert (reference / name).exists(), name
    results = json.load(open(reference / "eval.json"))
    for system in ("system1", "system2", "distilled"):
        assert set(results[system]) >= {"accuracy", "mean_tokens", "n", "seconds"}
        assert 0 <= results[system]["accuracy"] <= 1 and results[system]["n"] == 8
    assert results["system2"]["mean_tokens"] > results["distilled"]["mean_tokens"]  # CoT spends tokens
    assert results["filter"]["kept"] == sum(1 for _ in open(reference / "distill.jsonl"))
    assert results["filter"]["kept"] >= 1  # the pretrained tiny model writes answers that can be voted on
    report = (reference / "report.md").read_text()
    assert "| Distilled System 1 |" in report and "Filter `majority`: kept" in report
    assert (reference / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept = json.load(open(reference / "config.json"))
    assert kept["program"]["name"] == "cot" and kept["pretrain"]["steps"] == 60


def test_rerun_skips_every_complete_stage(reference, caplog):
    before = {name: os.stat(reference / name).st_mtime_ns for name in ARTIFACTS}
    caplog.set_level("INFO")
    assert main(["run", *TINY, "--workdir", str(reference)]) == 0
    assert {name: os.stat(reference / name).st_mtime_ns for name in ARTIFACTS} == before
    assert caplog.text.count("is complete; skipping") == 5  # pretrain, generate, filter, train, eval


def test_kill_and_rerun_resumes_to_the_same_result(reference, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", S2D_FAULT="rollout-chunk:1")  # killed after generate's 1st chunk
    proc = subprocess.Popen([sys.executable, "-m", "s2d_jax.cli", "run", *TINY, "--workdir", str(tmp_path),
                             "--config.generate.chunk=2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert not (tmp_path / "rollouts.jsonl").exists() and (tmp_path / "rollouts.jsonl.partial").exists()
    assert (tmp_path / "base").exists() and not (tmp_path / "eval.json").exists()
    assert main(["run", *TINY, "--workdir", str(tmp_path)]) == 0
    for name in ("rollouts.jsonl", "distill.jsonl", "filter_report.json"):
        assert (tmp_path / name).read_text() == (reference / name).read_text(), name
    ours, ref = json.load(open(tmp_path / "eval.json")), json.load(open(reference / "eval.json"))
    assert _without_seconds(ours) == _without_seconds(ref)


def test_a_different_config_on_the_same_workdir_is_refused(reference, capsys):
    assert main(["run", *TINY, "--workdir", str(reference), "--config.generate.samples=3"]) == 2
    err = capsys.readouterr().err
    assert "made with a different config (key 'generate.samples': 4 there, 3 now)" in err


def test_stage_order_errors(tmp_path, capsys):
    assert main(["generate", *TINY, "--workdir", str(tmp_path)]) == 2
    assert "base: no pretrained base model" in capsys.readouterr().err
    assert main(["eval", *TINY, "--workdir", str(tmp_path)]) == 2
    assert "model: no such directory (run `s2d train` first)" in capsys.readouterr().err


def test_report_from_a_given_eval_json(tmp_path):
    results = {
        "meta": {"task": "last_letters", "program": "cot", "model": "toy"},
        "system1": {"accuracy": 0.1, "mean_tokens": 5.0, "n": 100, "seconds": 1.0},
        "system2": {"accuracy": 0.8, "mean_tokens": 95.0, "n": 100, "seconds": 9.0, "maj@5": 0.85},
        "distilled": {"accuracy": 0.78, "mean_tokens": 5.0, "n": 100, "seconds": 1.0},
        "filter": {"filter": "majority", "total": 256, "kept": 200, "kept_fraction": 200 / 256,
                   "drops": {"tie": 56}},
    }
    md, png = write_report(results, str(tmp_path))
    text = open(md).read()
    assert "| System 2 (program) | 80.0 | 95.0 | 100 | 9.0 | 85.0 |" in text
    assert "| Distilled System 1 | 78.0 | 5.0 | 100 | 1.0 |  |" in text
    assert "Distilled System 1 vs System 2: -2.0 points at 0.05x its tokens per input; vs System 1: +68.0 points" in text
    assert "kept 200 of 256 unlabelled inputs (78.1%); drops: tie 56" in text
    assert open(png, "rb").read()[:4] == b"\x89PNG"
    assert markdown({"system1": results["system1"]}).count("| System 1") == 1  # partial results still render


@pytest.mark.parametrize("name", sorted(p.name for p in __import__("pathlib").Path("configs").glob("*.py")))
def test_every_shipped_config_is_valid(name):
    from s2d_jax.config import load_config
    from s2d_jax.system2.programs import get_program
    from s2d_jax.system2.tasks import get_task

    config = load_config(f"configs/{name}")
    if config.task.name:  # a model-only config (smollm2.py, for `convert`) names no task
        get_task(config.task.name), get_program(config.program.name), get_task(config.eval.task or config.task.name)
    assert config.train.batch_size % config.train.grad_accum == 0


def test_a_run_whose_filter_keeps_nothing_still_reports(tmp_path):
    # the random tiny model (no pretraining) never writes a parseable answer: nothing passes the filter
    assert main(["run", *TINY, "--workdir", str(tmp_path), "--config.pretrain.steps=0",
                 "--config.program.max_new_tokens=16", "--config.filter.min_share=0.75"]) == 0
    assert (tmp_path / "distill.jsonl").read_text() == "" and not (tmp_path / "model").exists()
    results = json.load(open(tmp_path / "eval.json"))
    assert results["distilled"] is None and results["system1"]["n"] == 8
    report = (tmp_path / "report.md").read_text()
    assert "| Distilled System 1 | (none: nothing was distilled) |" in report and "kept 0 of 6" in report
    assert (tmp_path / "report.png").exists()
    assert main(["train", *TINY, "--workdir", str(tmp_path), "--config.pretrain.steps=0"]) == 2  # alone: an error


def test_pretrain_builds_and_keeps_the_syllable_tokenizer(tmp_path, capsys):
    from s2d_jax.model import load_model
    from s2d_jax.tokenizer import load_tokenizer

    toy = [*TINY, "--workdir", str(tmp_path), "--config.tokenizer=syllables", "--config.pretrain.steps=4",
           "--config.pretrain.corpus_size=200", "--config.program.max_new_tokens=8", "--config.task.n=2"]
    assert main(["generate", *toy]) == 2  # no base model yet, so no tokenizer either
    assert "no pretrained base model" in capsys.readouterr().err
    assert main(["pretrain", *toy]) == 0
    tok, model = load_tokenizer(str(tmp_path / "base")), load_model(str(tmp_path / "base"))
    pieces = [tok.decode([i]) for i in tok("Kalo:o Mire:oe", add_special_tokens=False).input_ids]
    assert pieces == ["Ka", "lo", ":", "o", " Mi", "re", ":", "o", "e"]
    assert model.cfg.vocab_size >= len(tok) and model.cfg.vocab_size % 64 == 0
    assert model.cfg.eos_token_ids == (tok.eos_token_id,)
    assert main(["generate", *toy]) == 0  # later stages read the tokenizer saved with the base model
    rows = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 and all(r["stages"][0]["num_tokens"] <= 8 for r in rows)
