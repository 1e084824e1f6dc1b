"""`s2d run` end to end on configs/tiny.py: every artifact, skipping complete stages, resuming after a kill, the
kept config, and the report from a given eval.json."""

import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import pytest

from conftest import tiny_base
from s2d_jax.cli import main
from s2d_jax.report import markdown, write_report
from s2d_jax.system2.programs import get_program

TINY = ["--config", "configs/tiny.py"]
ARTIFACTS = ("config.json", "base", "rollouts.jsonl", "distill.jsonl", "filter_report.json", "checkpoints", "model",
             "metrics.jsonl", "eval.json", "report.md", "report.png")


def _without_seconds(results):
    return {k: ({kk: vv for kk, vv in v.items() if kk not in ("seconds", "seconds_total", "tokens_per_s", "mfu")}
                if isinstance(v, dict) else v) for k, v in results.items()}


# W&B as a user runs it without a network: its real offline run files, read back by `wandb_records`
TRACKED = ["--config.report.trackers=tensorboard,wandb", "--config.report.wandb.mode=offline"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    tiny_base(workdir)
    assert main(["run", *TINY, *TRACKED, "--workdir", str(workdir)]) == 0
    return workdir


def test_run_writes_every_artifact(reference):
    for name in ARTIFACTS:
        assert (reference / name).exists(), name
    results = json.load(open(reference / "eval.json"))
    for system in ("system1", "system2", "distilled"):
        assert set(results[system]) >= {"accuracy", "mean_tokens", "n", "seconds", "generated_tokens",
                                        "prompt_tokens", "flops"}
        assert 0 <= results[system]["accuracy"] <= 1 and results[system]["n"] == 8
        assert results[system]["flops"] > 0 and results[system]["prompt_tokens"] > 0
        assert 0 < sum(results[system]["answers"].values()) <= 8  # the five most frequent answers
    assert results["system2"]["mean_tokens"] > results["distilled"]["mean_tokens"]  # CoT spends tokens
    assert results["filter"]["kept"] == sum(1 for _ in open(reference / "distill.jsonl"))
    assert results["filter"]["kept"] >= 1  # the pretrained tiny model writes answers that can be voted on
    report = (reference / "report.md").read_text()
    assert "| Distilled System 1 |" in report and "Filter `majority`: kept" in report
    assert (reference / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept = json.load(open(reference / "config.json"))
    assert kept["program"]["name"] == "cot" and kept["pretrain"]["steps"] == 60


def test_trackers_get_every_stage_s_metrics(reference):
    """tracking.jsonl (always) and the W&B run (offline files) hold the loop's metrics under stable names; W&B's
    training curve is metrics.jsonl's; the run has the resolved config, the report as an artifact, the eval
    table; TensorBoard has its event file."""
    local = [json.loads(line) for line in open(reference / "tracking.jsonl")]
    names = set().union(*local)
    assert {"train/loss", "train/accuracy", "train/learning_rate", "train/tokens_per_s", "generate/tokens_per_s",
            "generate/generated_tokens", "filter/kept_fraction", "eval/system1/accuracy",
            "eval/distilled/accuracy", "eval/system2/mean_tokens"} <= names
    trained = [json.loads(line) for line in open(reference / "metrics.jsonl")]
    run_id = json.load(open(reference / "wandb_run.json"))["id"]
    (run_file,) = glob.glob(str(reference / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    records = list(wandb_records(run_file))
    (run,) = [r.run for r in records if r.HasField("run")]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert run.run_id == run_id and run.project == "s2d" and run.display_name == reference.name
    assert config["program"]["name"] == "cot" and config["train"]["steps"] == trained[-1]["step"]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.HasField("history")]
    curve = [(h["train/step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert curve == [(row["step"], pytest.approx(row["loss"])) for row in trained]
    results = json.load(open(reference / "eval.json"))
    (evaluated,) = [h for h in history if "eval/distilled/accuracy" in h]
    assert evaluated["eval/distilled/accuracy"] == results["distilled"]["accuracy"]
    assert any(h.get("filter/kept") == results["filter"]["kept"] for h in history)
    assert any("eval/table/nrows" in h and h["eval/table/nrows"] == 3 for h in history)  # system1, 2, distilled
    (artifact,) = [r.artifact for r in records if r.HasField("artifact") and r.artifact.type == "report"]
    assert {"report.png", "report.md", "eval.json"} <= {m.path for m in artifact.manifest.contents}
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(reference / "tensorboard"))


def _child_env(**extra) -> dict:
    """A subprocess's environment: W&B's service address, which this process's own W&B run exported, left out
    (the child starts its own service, as a user's command does)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return dict(env, JAX_PLATFORMS="cpu", **extra)


def wandb_records(path):
    """The records of a W&B run file (`run-ID.wandb`: a 7-byte header, then LevelDB-style log blocks of 32 KiB,
    each record a protobuf `Record` in one or more chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


HARNESS_TASK = """task: s2d_system1
dataset_path: json
dataset_kwargs:
  data_files: {{test: {inputs}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: [], max_gen_toks: 8, do_sample: false}}
metric_list: [{{metric: exact_match}}]
"""
REGISTRY_TASK = """task: last_letters_public
dataset_path: json
dataset_kwargs:
  data_files: {test: "data:last_letters"}
  field: examples
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: [], max_gen_toks: 8, do_sample: false}
metric_list: [{metric: exact_match}]
"""


def test_the_harness_agrees_with_eval_on_the_same_inputs(reference, tmp_path):
    """`s2d eval --harness`: a task YAML over s2d eval's own held-out inputs and System 1 prompts gives, for the
    base and the distilled model, the answers eval gave, input by input; a task YAML over registry data
    (`data:NAME` in its data_files) and a stock task (gsm8k) run offline from the mirror; the scores reach the
    trackers."""
    from s2d_jax.config import load_config
    from s2d_jax.stages.inputs import load_eval_inputs, system1_prompt

    config = load_config(TINY[1], [])
    task, examples = load_eval_inputs(config)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    inputs = tasks / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": system1_prompt(config, task, e), "answer": e.label}) + "\n"
                              for e in examples))
    (tasks / "s2d_system1.yaml").write_text(HARNESS_TASK.format(inputs=json.dumps(str(inputs))))
    (tasks / "last_letters_public.yaml").write_text(REGISTRY_TASK)
    assert main(["eval", *TINY, *TRACKED, "--workdir", str(reference), "--harness",
                 "s2d_system1,last_letters_public,gsm8k", f"--config.eval.harness.include_path={tasks}",
                 "--config.eval.harness.limit=8", "--config.eval.harness.num_fewshot=0"]) == 0
    scores = json.load(open(reference / "harness.json"))
    ours = [json.loads(line) for line in open(reference / "eval_inputs.jsonl")]
    rows = [json.loads(line) for line in open(reference / "harness_samples.jsonl")]
    results = json.load(open(reference / "eval.json"))
    for system in ("system1", "distilled"):
        answers = {r["doc_id"]: task.parse(r["response"]) for r in rows
                   if r["system"] == system and r["task"] == "s2d_system1"}
        assert [answers[k] for k in range(len(examples))] == [row[system]["answer"] for row in ours], system
        correct = [task.score(answers[k], e) for k, e in enumerate(examples)]
        assert sum(correct) / len(correct) == results[system]["accuracy"]
        assert scores[system]["last_letters_public"]["sample_len"] == 8
        assert scores[system]["gsm8k"]["sample_len"] == 8  # a stock task, offline, its data from the registry
        assert 0 <= scores[system]["gsm8k"]["exact_match,strict-match"] <= 1
    local = [json.loads(line) for line in open(reference / "tracking.jsonl")]
    assert any("harness/distilled/last_letters_public/exact_match/none" in row for row in local)


def test_rerun_skips_every_complete_stage(reference, caplog):
    before = {name: os.stat(reference / name).st_mtime_ns for name in ARTIFACTS}
    caplog.set_level("INFO")
    assert main(["run", *TINY, "--workdir", str(reference)]) == 0
    assert {name: os.stat(reference / name).st_mtime_ns for name in ARTIFACTS} == before
    assert caplog.text.count("is complete; skipping") == 5  # pretrain, generate, filter, train, eval


def test_kill_and_rerun_resumes_to_the_same_result(reference, tmp_path):
    tiny_base(tmp_path)
    env = _child_env(S2D_FAULT="rollout-chunk:1")  # killed after generate's 1st chunk
    proc = subprocess.Popen([sys.executable, "-m", "s2d_jax.cli", "run", *TINY, *TRACKED, "--workdir", str(tmp_path),
                             "--config.generate.chunk=2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert not (tmp_path / "rollouts.jsonl").exists() and (tmp_path / "rollouts.jsonl.partial").exists()
    assert not (tmp_path / "eval.json").exists()
    assert main(["run", *TINY, *TRACKED, "--workdir", str(tmp_path)]) == 0
    run_id = json.load(open(tmp_path / "wandb_run.json"))["id"]  # the resumed command continued the W&B run
    assert len(glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))) == 2
    for name in ("rollouts.jsonl", "distill.jsonl", "filter_report.json"):
        assert (tmp_path / name).read_text() == (reference / name).read_text(), name
    ours, ref = json.load(open(tmp_path / "eval.json")), json.load(open(reference / "eval.json"))
    assert _without_seconds(ours) == _without_seconds(ref)


def test_a_tracker_failing_mid_run_never_stops_training(reference, tmp_path):
    """W&B's service killed after the first training row (as a network or service failure would leave it): one
    warning, training ends as it would have, and the local metrics have every row."""
    for name in ("config.json", "rollouts.jsonl", "filter_report.json", "distill.jsonl"):
        shutil.copy(reference / name, tmp_path / name)
    shutil.copytree(reference / "base", tmp_path / "base")
    env = _child_env(S2D_FAULT="tracker-log:1:child=wandb-core")
    proc = subprocess.run([sys.executable, "-m", "s2d_jax.cli", "train", *TINY, *TRACKED, "--workdir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "tracker wandb failed" in line]) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    rows = lambda path: [json.loads(line) for line in open(path)]
    assert [r["loss"] for r in rows(tmp_path / "metrics.jsonl")] == [r["loss"] for r in rows(reference / "metrics.jsonl")]
    assert len([r for r in rows(tmp_path / "tracking.jsonl") if "train/loss" in r]) == len(rows(reference / "metrics.jsonl"))


def test_a_different_config_on_the_same_workdir_is_refused(reference, capsys):
    assert main(["run", *TINY, "--workdir", str(reference), "--config.generate.samples=3"]) == 2
    err = capsys.readouterr().err
    assert "made with a different config (key 'generate.samples': 4 there, 3 now)" in err


def test_stage_order_errors(tmp_path, capsys):
    assert main(["generate", *TINY, "--workdir", str(tmp_path)]) == 2
    assert "base: no pretrained base model" in capsys.readouterr().err
    assert main(["eval", *TINY, "--workdir", str(tmp_path)]) == 2
    assert "model: no such directory (run `s2d train` first)" in capsys.readouterr().err


def _results(s1=0.1, s2=0.8, d=0.78, task="last_letters"):
    row = lambda acc, tokens, seconds: {"accuracy": acc, "mean_tokens": tokens, "generated_tokens": tokens,  # noqa
                                        "prompt_tokens": 60.0, "flops": tokens * 1e9, "n": 100, "seconds": seconds}
    return {
        "meta": {"task": task, "program": "cot", "model": "toy", "system1_instruction": " End with it.",
                 "system1_tokens": 24, "system2_budgets": {"answer": 256}, "samples": 5},
        "system1": row(s1, 5.0, 1.0),
        "system2": {**row(s2, 95.0, 9.0), "maj@5": 0.85, "truncation": {"answer": 0.25}},
        "distilled": row(d, 5.0, 1.0),
        "filter": {"filter": "majority", "total": 256, "kept": 200, "kept_fraction": 200 / 256,
                   "drops": {"tie": 56}, "truncation": {"answer": 0.125}},
    }


def test_report_from_a_given_eval_json(tmp_path):
    results = _results()
    md, png = write_report(results, str(tmp_path))
    text = open(md).read()
    assert "| System 2 (program) | 80.0 | 95.0 | 60.0 | 9.5e+10 | 9.00 | 100 | 85.0 |" in text
    assert "| Distilled System 1 | 78.0 | 5.0 | 60.0 | 5e+09 | 1.00 | 100 |  |" in text
    assert ("Distilled System 1 vs System 2: -2.0 points at 0.053x its generated tokens per input; vs System 1: "
            "+68.0 points") in text
    assert "prompted with the input followed by 'End with it.', greedy, at most 24 new tokens" in text
    assert "System 2 truncation (share of calls that hit the budget): answer 25.0%." in text
    assert "kept 200 of 256 unlabelled inputs (78.1%); drops: tie 56" in text
    assert "Rollout truncation per stage: answer 12.5%." in text
    assert open(png, "rb").read()[:4] == b"\x89PNG" and (tmp_path / "report_flops.png").exists()
    assert markdown({"system1": results["system1"]}).count("| System 1") == 1  # partial results still render


def test_report_puts_several_runs_side_by_side_with_the_paper(tmp_path, capsys):
    for name, acc in (("rar2", 0.6), ("direct", 0.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(_results(d=acc, task="coin_flip")))
    out = tmp_path / "cmp"
    assert main(["report", str(tmp_path / "rar2"), str(tmp_path / "direct"), "--out", str(out)]) == 0
    text = (out / "comparison.md").read_text()
    assert text == capsys.readouterr().out
    assert "| Distilled System 1 | 60.0 / 5.0 / 5e+09 / 1.00 | 50.0 / 5.0 / 5e+09 / 1.00 |" in text
    assert (out / "comparison.png").exists()
    assert "| 50.0 / 5.0 / 5e+09 / 1.00 | 75.7 (unverified) |" in text  # the paper's column, package data
    assert "paper (Llama-2-70B-chat, accuracy)" in text and "arXiv 2407.06023" in text
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "nothing/eval.json: no such file (run `s2d eval`" in capsys.readouterr().err


def test_system1_self_consistency_baseline_without_a_filter_end_to_end(tmp_path):
    """The paper's baseline and ablation on the tiny config: the `direct` program (System 1 sampled N times) and
    `filter.name=none` (every input's first sample distilled)."""
    assert main(["run", *TINY, "--workdir", str(tmp_path), "--config.program.name=direct",
                 "--config.program.max_new_tokens=0", "--config.filter.name=none"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "rollouts.jsonl")]
    assert all([s["name"] for s in r["stages"]] == ["answer"] and r["stages"][0]["num_tokens"] <= 24 for r in rows)
    assert rows[0]["stages"][0]["prompt"] == rows[0]["input"] + get_program("direct").answer_format
    report = json.load(open(tmp_path / "filter_report.json"))
    kept = [json.loads(line) for line in open(tmp_path / "distill.jsonl")]
    assert report["filter"] == "none" and len(kept) == report["kept"] == 6 - report["drops"].get("unparsed", 0)
    first = {r["id"]: r["answer"] for r in rows if r["sample"] == 0}
    assert all(k["target"] == first[k["id"]] for k in kept)  # the first sample, votes or not
    results = json.load(open(tmp_path / "eval.json"))
    assert results["meta"]["program"] == "direct" and results["system2"]["generated_tokens"] <= 24


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


@pytest.mark.parametrize("rule, share, confidence", [("decided", 0.75, 0.95), ("beta", 0.25, 0.7)])
def test_vote_aware_sampling_draws_a_prefix_of_the_same_samples(reference, tmp_path, rule, share, confidence):
    """Adaptive rollouts are the full run's samples (same keys), each input cut where its rule stops; with
    `decided` the filter keeps exactly what the full-N vote keeps; filter_report says what was saved."""
    import shutil

    from s2d_jax.system2.adaptive import samples_needed
    from s2d_jax.system2.filters import vote

    shutil.copytree(reference / "base", tmp_path / "base")
    args = [*TINY, "--workdir", str(tmp_path), f"--config.generate.adaptive={rule}", "--config.generate.adaptive_wave=1",
            f"--config.filter.min_share={share}", f"--config.generate.adaptive_confidence={confidence}"]
    assert main(["generate", *args]) == 0 and main(["filter", *args]) == 0
    full = [json.loads(line) for line in open(reference / "rollouts.jsonl")]
    ours = [json.loads(line) for line in open(tmp_path / "rollouts.jsonl")]
    by_key = {(r["id"], r["sample"]): r for r in full}
    assert all(r == by_key[(r["id"], r["sample"])] for r in ours)  # the same samples, not new ones
    answers = {key: [r["answer"] for r in full if r["id"] == key] for key in dict.fromkeys(r["id"] for r in full)}
    for key, votes in answers.items():
        drawn = [r["sample"] for r in ours if r["id"] == key]
        assert drawn == list(range(samples_needed(votes, 4, 1, rule, share, confidence)))
    report = json.load(open(tmp_path / "filter_report.json"))["adaptive"]
    assert report["samples_mean"] == len(ours) / 6 < 4 and sum(report["samples_histogram"].values()) == 6
    assert report["tokens_saved"] > 0  # some inputs stopped early
    if rule == "decided":  # the same decisions as the full-N vote
        kept = [(r["id"], r["target"]) for r in map(json.loads, open(tmp_path / "distill.jsonl"))]
        assert kept == [(key, str(d.answer)) for key, v in answers.items() if (d := vote(v, share)).answer]
