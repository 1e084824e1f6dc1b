"""`s2d generate` and `s2d filter` on configs/tiny.py: artifact schemas, resume after a kill, determinism."""

import json
import os
import signal
import subprocess
import sys

import pytest

from s2d_jax.cli import main
from s2d_jax.config import load_config
from s2d_jax.errors import S2DError
from s2d_jax.stages import filter as filter_stage
from s2d_jax.system2.programs import PROGRAMS, Program, Stage, get_program
from s2d_jax.system2.tasks import get_task

# The random tiny model (no pretraining) with RaR 2-step and short stages: generate and filter in seconds.
RANDOM = ["pretrain.steps=0", "program.name=rar2", "program.max_new_tokens=24", "task.size=3"]
TINY = ["--config", "configs/tiny.py", *(f"--config.{o}" for o in RANDOM)]


def _generate(workdir, *overrides):
    return main(["generate", *TINY, "--workdir", str(workdir), *overrides])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ref")
    assert _generate(workdir) == 0
    return (workdir / "rollouts.jsonl").read_text()


def test_rollouts_schema_and_determinism(reference, tmp_path):
    rows = [json.loads(line) for line in reference.splitlines()]
    assert len(rows) == 6 * 4 and len({(r["id"], r["sample"]) for r in rows}) == 24
    for r in rows:
        assert set(r) == {"id", "sample", "input", "stages", "answer", "num_tokens", "prompt_tokens"}
        assert [s["name"] for s in r["stages"]] == ["rephrase", "answer"]
        assert all(set(s) >= {"name", "prompt", "output", "num_tokens", "prompt_tokens", "truncated"}
                   for s in r["stages"])
        assert all(s["truncated"] == (s["num_tokens"] == 24) for s in r["stages"])  # program.max_new_tokens=24
        assert r["num_tokens"] == sum(s["num_tokens"] for s in r["stages"])
        assert r["prompt_tokens"] == sum(s["prompt_tokens"] for s in r["stages"]) > 0
        assert r["input"] in r["stages"][0]["prompt"] and r["stages"][0]["output"] in r["stages"][1]["prompt"]
    assert len({r["stages"][0]["output"] for r in rows if r["id"] == rows[0]["id"]}) > 1  # samples differ
    assert _generate(tmp_path) == 0
    assert (tmp_path / "rollouts.jsonl").read_text() == reference  # same config and seed, same file


def test_rerun_skips_a_complete_artifact(reference, tmp_path):
    (tmp_path / "rollouts.jsonl").write_text(reference)
    before = os.stat(tmp_path / "rollouts.jsonl").st_mtime_ns
    assert _generate(tmp_path) == 0
    assert os.stat(tmp_path / "rollouts.jsonl").st_mtime_ns == before


def test_resume_after_a_kill_and_a_torn_line(reference, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", S2D_FAULT="rollout-chunk:1")  # after the first chunk of several
    proc = subprocess.Popen([sys.executable, "-m", "s2d_jax.cli", "generate", *TINY, "--workdir", str(tmp_path),
                             "--config.generate.chunk=2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=240) == -signal.SIGKILL
    partial = tmp_path / "rollouts.jsonl.partial"
    assert not (tmp_path / "rollouts.jsonl").exists()
    written = partial.read_text()
    assert 0 < written.count("\n") < 24
    with open(partial, "a") as f:
        f.write('{"id": "torn')  # a kill in the middle of a line
    assert _generate(tmp_path) == 0
    assert (tmp_path / "rollouts.jsonl").read_text() == reference  # no duplicate, no loss, no torn line
    assert not partial.exists()


def _rollouts(path, answers_by_id):
    with open(path, "w") as f:
        for key, answers in answers_by_id.items():
            for j, a in enumerate(answers):
                stages = [{"name": "answer", "output": f"Sample {j} says {a}.", "truncated": a is None}]
                f.write(json.dumps({"id": key, "sample": j, "input": f"Take the last letters of \"{key}\".",
                                    "stages": stages, "answer": a, "num_tokens": 5}) + "\n")


def test_filter_writes_distill_set_and_report(tmp_path):
    _rollouts(tmp_path / "rollouts.jsonl", {"x": ["ab", "ab", "cd", None], "y": ["ab", "cd"], "z": [None, None]})
    config = load_config("configs/tiny.py", [*RANDOM, "filter.min_share=0.5"])
    filter_stage(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "distill.jsonl")]
    assert rows == [{"id": "x", "prompt": "Take the last letters of \"x\".", "target": "ab",
                     "votes": {"ab": 2, "cd": 1}, "agreement": 0.5}]
    report = json.load(open(tmp_path / "filter_report.json"))
    assert report["kept"] == 1 and report["drops"] == {"all_invalid": 1, "tie": 1}
    assert report["truncation"] == {"answer": 3 / 8}  # the unparsed samples were cut off


@pytest.mark.parametrize("overrides, target, prompt_suffix, kept", [
    # the paper's System 1: the program's answer-format instruction, and a target in that format
    (["program.system1_format=true"], "The answer is: ab", " End with 'The answer is: ' followed by your final "
                                                           "answer.", ["x"]),
    # S2A as the paper distils it: the chosen sample's whole final response (the first sample with the answer)
    (["filter.target=response"], "Sample 0 says ab.", "", ["x"]),
    # no filter (the ablation): every input whose first sample parsed, its answer the target
    (["filter.name=none"], "ab", "", ["x", "y"]),
    # the vote threshold: a 3 of 4 majority is needed
    (["filter.min_share=0.75"], "ab", "", []),
])
def test_filter_targets_prompts_and_ablations(tmp_path, overrides, target, prompt_suffix, kept):
    _rollouts(tmp_path / "rollouts.jsonl", {"x": ["ab", "ab", "cd", None], "y": ["ab", "cd"], "z": [None, None]})
    filter_stage(load_config("configs/tiny.py", [*RANDOM, "filter.min_share=0.5", *overrides]), str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "distill.jsonl")]
    assert [r["id"] for r in rows] == kept
    if rows:
        assert rows[0]["target"] == target
        assert rows[0]["prompt"] == "Take the last letters of \"x\"." + prompt_suffix


def test_bad_rollout_line_names_file_and_line(tmp_path):
    (tmp_path / "rollouts.jsonl").write_text('{"id": "a", "sample": 0, "input": "q", "answer": "x"}\n{oops\n')
    with pytest.raises(S2DError, match=r"rollouts.jsonl: line 2: not valid JSON"):
        filter_stage(load_config("configs/tiny.py", RANDOM), str(tmp_path))
    (tmp_path / "rollouts.jsonl").write_text('{"id": "a", "sample": 0, "input": "q"}\n')
    with pytest.raises(S2DError, match=r"rollouts.jsonl: line 1: missing field 'answer'"):
        filter_stage(load_config("configs/tiny.py", RANDOM), str(tmp_path))
    assert not (tmp_path / "distill.jsonl").exists()


@pytest.mark.parametrize("override, message", [
    ("task.name=letters", "key 'task.name': 'letters' is not a task (tasks: coin_flip, gsm8k, last_letters, "
                          "mt_bench_judge, oasst2_judge, sycophancy)"),
    ("program.name=tot", "key 'program.name': 'tot' is not a program (programs: bsm, cot, direct, rar1, rar2, "
                         "s2a)"),
    ("program.stage_tokens=answer=9,think=3", "key 'program.stage_tokens': program 'rar2' has no stage 'think' "
                                              "(stages: rephrase, answer)"),
    ("task.path=/no/such.json", "config key 'task.path': /no/such.json: no such file or directory"),
])
def test_bad_config_values_are_one_line_errors(tmp_path, override, message, capsys):
    assert _generate(tmp_path, f"--config.{override}") == 2
    assert capsys.readouterr().err.strip().endswith(message)


def test_unknown_filter(tmp_path, capsys):
    assert main(["filter", *TINY, "--workdir", str(tmp_path), "--config.filter.name=usc2"]) == 2
    assert ("key 'filter.name' = 'usc2' is not allowed (expected one of 'majority', 'order_swap', 'usc', 'none')"
            in capsys.readouterr().err)


def test_budgets_are_set_by_config_and_may_pass_256(tmp_path):
    rar2 = get_program("rar2")
    assert rar2.budgets() == {"rephrase": 128, "answer": 256}  # each stage's own
    assert rar2.budgets(512) == {"rephrase": 512, "answer": 512}  # program.max_new_tokens sets them all
    assert rar2.budgets(512, "rephrase=64") == {"rephrase": 64, "answer": 512}
    assert get_program("direct").budgets(answer_tokens=16) == {"answer": 16}  # System 1's budget for the task
    # a real run past 256 tokens: greedy on the random tiny model, which does not stop by itself
    assert _generate(tmp_path, "--config.program.name=rar1", "--config.program.max_new_tokens=300",
                     "--config.generate.samples=1", "--config.generate.temperature=0", "--config.task.n=1") == 0
    (row,) = [json.loads(line) for line in open(tmp_path / "rollouts.jsonl")]
    assert row["stages"][0]["num_tokens"] == 300 and row["stages"][0]["truncated"]


def test_template_fields_are_checked():
    bad = Program("bad", (Stage("one", "{input} {two}"), Stage("two", "{one}")))
    with pytest.raises(S2DError, match=r"stage 'one': template field \{two\} is not defined"):
        bad.check()
    for program in PROGRAMS.values():  # every shipped program is well formed for its task's fields
        program.check(["question", "response_a", "response_b"] if program.name == "bsm" else [])


def test_every_program_formats_real_rows():
    example = get_task("coin_flip").generate(1, seed=0)[0]
    for name in ("cot", "rar1", "rar2", "s2a"):
        stage = get_program(name).stages[0]
        prompt = stage.template.format(input=example.input)
        assert example.input in prompt and "{" not in prompt
    rar2 = get_program("rar2").stages[1].template.format(input="Q?", rephrase="Q, expanded?")
    assert rar2.startswith("(original) Q?\n(rephrased) Q, expanded?")


def test_bsm_with_order_swap_end_to_end(tmp_path):
    from conftest import data as registry
    from test_system2 import _oasst2

    registry("mt_bench/judge_prompts.jsonl")  # the judge prompts System 1's prompt is built from
    data = _oasst2(tmp_path / "oasst2.jsonl.gz")
    args = ["--config.task.name=oasst2_judge", f"--config.task.path={data}", "--config.program.name=bsm",
            "--config.filter.name=order_swap", "--config.generate.samples=2", "--config.task.n=0"]
    assert _generate(tmp_path, *args) == 0
    rows = [json.loads(line) for line in open(tmp_path / "rollouts.jsonl")]
    ids = {r["id"] for r in rows}
    # the English pairs of the fixture's train split (every tree hashes into it), each with its swapped twin
    assert {i for i in ids if ":swap" not in i} == {"oasst2:p1", "oasst2:p2", "oasst2:p4"}
    assert {i for i in ids if i.endswith(":swap")} == {i + ":swap" for i in ids if ":swap" not in i}
    for r in rows:  # branch, one solve call per criterion (fan-out), merge
        names = [s["name"] for s in r["stages"]]
        assert names[0] == "branch" and names[-1] == "merge" and 1 <= names.count("solve") <= 5
        assert names.count("solve") == len(r["stages"][0]["parsed"])  # one solve call per criterion of the plan
        assert all(s["item"] in r["stages"][-1]["prompt"] for s in r["stages"] if s["name"] == "solve")
        assert all("parsed" in s for s in r["stages"] if s["name"] == "solve")  # scores, or None
    swapped = next(r for r in rows if r["id"].endswith(":swap"))
    first = next(r for r in rows if r["id"] == swapped["id"][:-len(":swap")])
    a_of = lambda prompt: prompt.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]  # noqa: E731
    b_of = lambda prompt: prompt.split("[The Start of Assistant B's Answer]\n")[1].split("\n[The End")[0]  # noqa: E731
    assert a_of(swapped["stages"][-1]["prompt"]) == b_of(first["stages"][-1]["prompt"])
    assert main(["filter", *TINY, "--workdir", str(tmp_path), *args]) == 0
    report = json.load(open(tmp_path / "filter_report.json"))
    assert report["filter"] == "order_swap" and report["total"] == 3  # one decision per input, both orders used
    kept = [json.loads(line) for line in open(tmp_path / "distill.jsonl")]
    assert all(k["target"] in ("[[A]]", "[[B]]", "[[C]]") and ":swap" not in k["id"] for k in kept)


def test_order_swap_and_usc_filters_on_constructed_rollouts(tmp_path):
    _rollouts(tmp_path / "rollouts.jsonl", {"x": ["A", "A"], "x:swap": ["B", "B"], "y": ["A", "A"],
                                            "y:swap": ["A", "A"]})
    config = load_config("configs/tiny.py", [*RANDOM, "filter.name=order_swap", "task.name=mt_bench_judge"])
    filter_stage(config, str(tmp_path))
    assert [json.loads(line)["id"] for line in open(tmp_path / "distill.jsonl")] == ["x"]
    assert json.load(open(tmp_path / "filter_report.json"))["drops"] == {"order_inconsistent": 1}
    usc_dir = tmp_path / "usc"
    usc_dir.mkdir()
    _rollouts(usc_dir / "rollouts.jsonl", {"q1": ["milne", "dahl", "milne"], "q2": [None, None, None]})
    config = load_config("configs/tiny.py", [*RANDOM, "filter.name=usc", "task.name=sycophancy"])
    filter_stage(config, str(usc_dir))  # the tiny random model rarely names a valid response: drops say why
    report = json.load(open(usc_dir / "filter_report.json"))
    assert report["total"] == 2 and report["kept"] + sum(report["drops"].values()) == 2
    assert set(report["drops"]) <= {"usc_no_choice", "usc_chose_invalid", "all_invalid"}


def test_order_swap_needs_a_judging_task(tmp_path, capsys):
    assert _generate(tmp_path, "--config.filter.name=order_swap") == 2
    assert "order_swap needs a pairwise judging task; 'last_letters' has no swapped form" in capsys.readouterr().err
