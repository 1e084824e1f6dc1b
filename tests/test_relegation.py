"""Relegation: the router's decisions, the routed system's cost and its sweep, rounds end to end (killed and
resumed), and bad route / loop / teacher values (the teacher itself: test_teacher.py)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest

from s2d_jax.relegation import routing
from conftest import tiny_base
from s2d_jax.cli import main
from s2d_jax.config import load_config

TINY = ["--config", "configs/tiny.py"]
ROUNDS = [*TINY, "--config.route.method=agreement", "--config.loop.rounds=2", "--config.task.n=8",
          "--config.loop.round_size=4", "--config.eval.routers=logprob",
          "--config.generate.chunk=2", "--config.route.thresholds=(0.0,0.3,0.6,0.8,1.0)"]
ARTIFACTS = ("route.jsonl", "route_report.json", "rollouts.jsonl", "distill.jsonl", "train.jsonl", "eval_inputs.jsonl")
TIMED = ("seconds", "seconds_total", "router_seconds", "tokens_per_s", "mfu")


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMED}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ the router


def test_agreement_and_token_probability_on_constructed_answers():
    assert routing.agreement(["ab", "ab", "cd", None]) == ("ab", 0.5)  # unparsed samples count in the share
    assert routing.agreement(["cd", "ab", "ab", "cd"]) == ("cd", 0.5)  # a tie keeps the answer seen first
    assert routing.agreement([None, None]) == (None, 0.0)
    assert routing.agreement(["x"] * 4) == ("x", 1.0)
    assert routing.token_probability([math.log(0.5)] * 3) == pytest.approx(0.5)
    assert routing.token_probability([0.0, 0.0]) == 1.0 and routing.token_probability([]) == 0.0


def test_router_calibration_against_sklearn_on_constructed_rows():
    from sklearn.metrics import roc_auc_score

    rows = [{"confidence": c, "correct": k} for c, k in
            [(0.95, True), (0.9, True), (0.9, False), (0.6, True), (0.55, False), (0.2, False), (0.05, False)]]
    c = routing.calibration(rows)
    assert c["auroc"] == pytest.approx(roc_auc_score([r["correct"] for r in rows], [r["confidence"] for r in rows]))
    # equal-width bins of 0.1: [0.9, 1] holds three rows (two right), [0.6, 0.7) one, ...
    by_bin = {9: ([0.95, 0.9, 0.9], 2), 6: ([0.6], 1), 5: ([0.55], 0), 2: ([0.2], 0), 0: ([0.05], 0)}
    want = sum(len(cs) / 7 * abs(k / len(cs) - sum(cs) / len(cs)) for cs, k in by_bin.values())
    assert c["ece"] == pytest.approx(want) and c["n"] == 7 and c["right"] == 3
    assert routing.calibration([{"confidence": 0.5, "correct": True}])["auroc"] is None  # one class: undefined


@pytest.mark.parametrize("confidence, threshold, up", [
    (0.0, 0.0, False), (1.0, 0.0, False),  # threshold 0: System 1 always answers
    (1.0, 1.0, False), (0.999, 1.0, True),  # threshold 1: only a unanimous (or certain) System 1 answers
    (0.75, 0.75, False), (0.7499, 0.75, True),  # the threshold itself is confident
])
def test_routing_decisions_at_the_edges(confidence, threshold, up):
    assert routing.escalated(confidence, threshold) is up


def _rows():
    one = [dict(id=str(i), correct=c, confidence=conf, generated_tokens=4, prompt_tokens=10, flops=100.0)
           for i, (c, conf) in enumerate([(True, 1.0), (False, 0.5), (True, 0.75), (False, 0.25)])]
    two = [dict(id=str(i), correct=c, generated_tokens=30 + i, prompt_tokens=50, flops=1000.0 + i)
           for i, c in enumerate([False, True, True, True])]
    return one, two


def test_routed_cost_counts_every_system1_sample_and_only_escalated_system2_calls():
    one, two = _rows()
    r = routing.routed(one, two, 0.75, seconds=(2.0, 40.0))
    # escalated: inputs 1 (0.5) and 3 (0.25); System 1 answers 0 and 2
    assert r["escalated_n"] == 2 and r["escalated"] == 0.5
    assert r["accuracy"] == (1 + 1 + 1 + 1) / 4  # S1 right on 0 and 2, S2 right on 1 and 3
    assert r["generated_tokens"] == (4 * 4 + 31 + 33) / 4
    assert r["prompt_tokens"] == (4 * 10 + 2 * 50) / 4
    assert r["flops"] == pytest.approx((400 + 1001 + 1003) / 4)
    assert r["seconds_total"] == pytest.approx(2.0 + 40.0 * (1001 + 1003) / sum(x["flops"] for x in two))
    never, always = routing.routed(one, two, 0.0), routing.routed(one, two, 1.01 - 0.01 + 1e-9)
    assert never["escalated"] == 0 and never["accuracy"] == 0.5 and never["generated_tokens"] == 4
    assert always["escalated"] == 1 and always["accuracy"] == 0.75  # System 2's accuracy, both costs
    assert always["generated_tokens"] == 4 + sum(x["generated_tokens"] for x in two) / 4
    with pytest.raises(ValueError):
        routing.routed(one, two[::-1], 0.5)


def test_the_routers_samples_of_one_prompt_compute_the_prompt_once():
    from s2d_jax import evaluate
    from s2d_jax.model.config import PRESETS
    from s2d_jax.sampling.sampler import Sample

    cfg = PRESETS["tiny"]
    group = [Sample("ab", [], 3, "stop", prompt_tokens=40) for _ in range(4)]
    shared, apart = evaluate.calls_cost(group, cfg, shared_prompt=True), evaluate.calls_cost(group, cfg)
    assert shared["prompt_tokens"] == apart["prompt_tokens"] == 160  # billed per sample, as an API bills
    assert shared["flops"] == pytest.approx(evaluate.call_flops(cfg, 40, 3)
                                            + 3 * evaluate.call_flops(cfg, 40, 3, read_prompt=False))


def test_sweep_thresholds_include_the_operating_point():
    c = load_config("configs/tiny.py", ["route.threshold=0.33"])
    assert routing.thresholds(c.route) == sorted(set(routing.GRID) | {0.33})
    c = load_config("configs/tiny.py", ["route.thresholds=(1.0,0.5)"])
    assert routing.thresholds(c.route) == [0.5, 0.75, 1.0]


def test_a_mixed_size_pool_takes_every_size_in_turn():
    from s2d_jax.stages.inputs import load_inputs, pool_size

    c = load_config("configs/demo.py", ["task.size=1", "task.size_max=3", "task.n=7", "task.offset=2"])
    _, examples = load_inputs(c)
    assert [len(e.meta["words"]) for e in examples] == [3, 1, 2, 3, 1, 2, 3] and pool_size(c) == 7
    whole = load_inputs(load_config("configs/demo.py", ["task.size=1", "task.size_max=3", "task.n=9"]))[1]
    assert [e.id for e in examples] == [e.id for e in whole[2:]]  # an offset is a slice of the same pool


# ------------------------------------------------------------------------------------------ rounds


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rounds")
    tiny_base(workdir)
    assert main(["run", *ROUNDS, "--workdir", str(workdir)]) == 0
    return workdir


def test_rounds_write_each_round_and_the_rounds_report(reference):
    one, two = reference / "rounds" / "1", reference / "rounds" / "2"
    for name in ARTIFACTS + ("eval.json", "report.md", "round.json"):
        assert (one / name).exists() and (two / name).exists(), name
    assert json.load(open(one / "round.json"))["system1"] == ""  # round 1: the base model
    trained = (one / "model").exists()
    assert json.load(open(two / "round.json"))["system1"] == ("rounds/1/model" if trained else "")
    pools = [[json.loads(x)["id"] for x in open(d / "route.jsonl")] for d in (one, two)]
    assert len(pools[0]) == len(pools[1]) == 4 and not set(pools[0]) & set(pools[1])  # consecutive slices
    kept = [x for d in (one, two) for x in open(d / "distill.jsonl")]
    assert sorted(open(two / "train.jsonl")) == sorted(kept)  # loop.accumulate: both rounds' kept examples
    rows = json.load(open(reference / "rounds.json"))
    assert [r["round"] for r in rows] == [1, 2]
    for row, d in zip(rows, (one, two)):
        route = json.load(open(d / "route_report.json"))
        assert row["escalated"] == route["escalated"] and row["pool"] == 4
        escalated = {json.loads(x)["id"] for x in open(d / "route.jsonl") if json.loads(x)["escalated"]}
        assert {json.loads(x)["id"] for x in open(d / "rollouts.jsonl")} == escalated  # only they saw System 2
    results = json.load(open(two / "eval.json"))
    assert results["meta"]["models"]["system1"] == ("rounds/1/model" if trained else "base")
    assert results["routed"]["system1"] == "rounds/2/model"
    assert results["system2"] == _without_per_input(json.load(open(one / "eval.json"))["system2"])  # reused
    report = (reference / "report.md").read_text()
    assert "| round | System 1 | pool escalated |" in report and (reference / "rounds.png").exists()


def test_a_rounds_directory_is_guarded_by_its_workdir(reference, capsys):
    """`s2d eval` inside rounds/R with other routing keys would rewrite the round's eval.json: refused against the
    workdir's kept config, and nothing in the round (or a kept config of its own) is written."""
    two = reference / "rounds" / "2"
    before = {p.name: p.read_bytes() for p in two.iterdir() if p.is_file()}
    for loop in ("2", "1"):  # as the run was made, and as a one-round eval
        code = main(["eval", *ROUNDS, "--workdir", str(two), "--config.route.method=logprob",
                     f"--config.loop.rounds={loop}"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"s2d: error: {reference}/config.json: this workdir was made with a "
                                            f"different config (key "), err
    assert {p.name: p.read_bytes() for p in two.iterdir() if p.is_file()} == before


def _without_per_input(row):
    return {k: v for k, v in row.items() if k != "per_input"}


def test_the_sweep_equals_one_routed_eval_per_threshold(reference):
    """Each sweep point is what routing for real gives: System 1's samples on every input, then System 2 run on the
    escalated inputs alone (fresh calls), scored and costed."""
    from s2d_jax import evaluate
    from s2d_jax.build import build_model, build_system2, build_tokenizer
    from s2d_jax.stages.inputs import load_eval_inputs, program_args
    from s2d_jax.stages.route import router_args
    from s2d_jax.system2.programs import get_program

    config = load_config("configs/tiny.py", [a.split("--config.")[1] for a in ROUNDS[2:]])
    where = str(reference / "rounds" / "2")
    results = json.load(open(os.path.join(where, "eval.json")))
    task, examples = load_eval_inputs(config)
    student = build_model(config, path=os.path.join(where, "model")), build_tokenizer(config, where)
    teacher = build_system2(config, None, where)
    args = program_args(config, task)
    rows, _ = evaluate.router(*student, task, examples, **router_args(config, task, None))
    assert [p["threshold"] for p in results["sweep"]] == [0.0, 0.3, 0.6, 0.75, 0.8, 1.0]  # with route.threshold
    for point in results["sweep"]:
        up = [routing.escalated(r["confidence"], point["threshold"]) for r in rows]
        sent = [e for e, u in zip(examples, up) if u]
        two = evaluate.system2(get_program("cot"), *teacher, task, sent, samples=1, budgets=args["budgets"],
                               params=args["params"], chat=config.program.chat)["per_input"] if sent else []
        answers = iter(two)
        correct = sum(bool(task.score(next(answers)["answer"] if u else r["answer"], e))
                      for e, r, u in zip(examples, rows, up))
        tokens = sum(r["generated_tokens"] for r in rows) + sum(t["generated_tokens"] for t in two)
        flops = sum(r["flops"] for r in rows) + sum(t["flops"] for t in two)
        assert point["escalated_n"] == sum(up)
        assert point["accuracy"] == correct / len(examples)
        assert point["generated_tokens"] == tokens / len(examples)
        assert point["flops"] == pytest.approx(flops / len(examples))


def test_the_logprob_router_reads_system1s_greedy_answer(reference):
    """`logprob`: System 1's own greedy answer (as eval's System 1 row gives it) with its per-token probability."""
    from s2d_jax import evaluate
    from s2d_jax.build import build_model, build_tokenizer
    from s2d_jax.sampling import Sampler
    from s2d_jax.stages.inputs import load_eval_inputs, system1_prompt
    from s2d_jax.stages.route import router_args

    config = load_config("configs/tiny.py", [a.split("--config.")[1] for a in ROUNDS[2:]] + ["route.method=logprob"])
    where = str(reference / "rounds" / "2")
    task, examples = load_eval_inputs(config)
    model, tok = build_model(config, path=os.path.join(where, "model")), build_tokenizer(config, where)
    rows, _ = evaluate.router(model, tok, task, examples, **router_args(config, task, None))
    greedy = evaluate.system1(model, tok, task, examples, prompt=lambda x: system1_prompt(config, task, x),
                              max_new_tokens=config.eval.max_new_tokens, chat=config.program.chat)["per_input"]
    assert [r["answer"] for r in rows] == [g["answer"] for g in greedy]
    assert [r["generated_tokens"] for r in rows] == [g["generated_tokens"] for g in greedy]  # one call, no samples
    outs = Sampler(model, tok).generate([system1_prompt(config, task, x) for x in examples], logprobs=True,
                                        max_new_tokens=config.eval.max_new_tokens, chat=config.program.chat,
                                        progress=False)
    expected = [math.exp(sum(s.logprobs) / len(s.logprobs)) for (s,) in outs]
    assert [r["confidence"] for r in rows] == pytest.approx(expected)
    assert all(0 < r["confidence"] <= 1 for r in rows)
    # `eval.routers=logprob` beside route.method=agreement: both swept on the same System 2 rows, one table
    results = json.load(open(os.path.join(where, "eval.json")))
    routers = results["routers"]
    assert list(routers) == ["agreement", "logprob"]
    assert _untimed(routers["agreement"]["sweep"]) == _untimed(results["sweep"])
    assert routers["agreement"]["calibration"] == results["routed"]["calibration"]
    two = [{"id": p["id"], **p["system2"]} for p in map(json.loads, open(os.path.join(where, "eval_inputs.jsonl")))]
    scored = [{**r, "correct": bool(task.score(r["answer"], e))} for r, e in zip(rows, examples)]
    assert _untimed(routers["logprob"]["sweep"]) == _untimed(routing.sweep(scored, two, routing.thresholds(config.route)))
    assert routers["logprob"]["calibration"] == routing.calibration(scored)
    assert routers["logprob"]["router"]["generated_tokens"] == sum(r["generated_tokens"] for r in rows) / len(rows)
    table = [line for line in open(os.path.join(where, "report.md")) if line.startswith(("| agreement |", "| logprob |"))]
    assert len(table) == 2


def test_rounds_killed_mid_round_resume_to_the_same_artifacts(reference, tmp_path):
    first = json.load(open(reference / "rounds" / "1" / "route_report.json"))["escalated"]
    second = json.load(open(reference / "rounds" / "2" / "route_report.json"))["escalated"]
    assert second >= 1  # round 2 has rollouts to kill in
    tiny_base(tmp_path)
    env = dict(os.environ, JAX_PLATFORMS="cpu", S2D_FAULT=f"rollout-chunk:{-(-first // 2) + 1}")
    proc = subprocess.run([sys.executable, "-m", "s2d_jax.cli", "run", *ROUNDS, "--workdir", str(tmp_path)],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "rounds" / "1" / "eval.json").exists()  # round 1 complete, round 2 mid-generate
    assert (tmp_path / "rounds" / "2" / "route.jsonl").exists()
    assert not (tmp_path / "rounds" / "2" / "rollouts.jsonl").exists() and not (tmp_path / "rounds.json").exists()
    assert main(["run", *ROUNDS, "--workdir", str(tmp_path)]) == 0
    for r in ("1", "2"):
        for name in ARTIFACTS:
            if name.endswith(".jsonl"):
                assert (tmp_path / "rounds" / r / name).read_text() == (reference / "rounds" / r / name).read_text()
        for name in ("route_report.json", "eval.json"):
            assert _untimed(json.load(open(tmp_path / "rounds" / r / name))) == _untimed(
                json.load(open(reference / "rounds" / r / name))), name
    assert _untimed(json.load(open(tmp_path / "rounds.json"))) == _untimed(json.load(open(reference / "rounds.json")))


def test_rounds_over_a_stream_go_on_as_inputs_arrive(reference, tmp_path, capsys):
    """`loop.round_size`: rerun with a third round over 4 more inputs; rounds 1 and 2 are kept byte for byte, round
    3 takes the next 4 inputs with round 2's model as its System 1, and the report covers the three. A stream too
    short for the rounds, or fewer rounds, is one line and changes nothing."""
    work = tmp_path / "work"
    shutil.copytree(reference, work)
    files = lambda: {p: p.read_bytes() for p in work.rglob("*") if p.is_file() and p.name != ".s2d.lock"}
    before = files()
    for overrides, message in (
            (["loop.rounds=4", "task.n=14"], "config key 'loop.round_size': 4 rounds of 4 inputs need 16 unlabelled "
                                             "inputs; the stream has 14 (round 4 would have 2)"),
            (["loop.rounds=1"], "loop.rounds may only grow on a workdir (2 there, 1 now)"),
            (["loop.rounds=3", "task.n=12", "loop.round_size=3"], "key 'loop.round_size': 4 there, 3 now")):
        code = main(["run", *ROUNDS, "--workdir", str(work), *(f"--config.{o}" for o in overrides)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert files() == before
    assert main(["run", *ROUNDS, "--workdir", str(work), "--config.loop.rounds=3", "--config.task.n=12"]) == 0
    after = files()
    assert all(after[p] == b for p, b in before.items() if "rounds" in p.relative_to(work).parts[:1])
    pools = [[json.loads(x)["id"] for x in open(work / "rounds" / r / "route.jsonl")] for r in "123"]
    assert len(pools[2]) == 4 and not set(pools[2]) & (set(pools[0]) | set(pools[1]))
    trained = (work / "rounds" / "2" / "model").exists()
    assert json.load(open(work / "rounds" / "3" / "round.json"))["system1"] == (
        "rounds/2/model" if trained else json.load(open(work / "rounds" / "2" / "round.json"))["system1"])
    assert [r["round"] for r in json.load(open(work / "rounds.json"))] == [1, 2, 3]
    assert json.load(open(work / "config.json"))["loop"]["rounds"] == 3


@pytest.mark.parametrize("stage, overrides, message", [
    ("run", ["route.method=votes"], "key 'route.method' = 'votes' is not allowed (expected one of 'none', "
                                    "'agreement', 'logprob', 'probe', 'self')"),
    ("run", ["eval.routers=self"], "key 'eval.routers': 'self' reads the marker a model learns with "
                                      "route.method=self only"),
    ("run", ["route.method=self", "eval.routers=probe"], "key 'eval.routers': 'probe' trains on the "
                                                            "held-out examples that route.method=self teaches"),
    ("run", ["route.method=self", "route.marker="], "key 'route.marker': an empty marker cannot be told"),
    ("run", ["route.threshold=1.5"], "key 'route.threshold' = 1.5 is not allowed (expected [0.0, 1.0])"),
    ("run", ["route.thresholds=(0.5,2)"], "key 'route.thresholds': 2 is not a threshold"),
    ("run", ["route.samples=1"], "key 'route.samples' = 1 is not allowed (expected >= 2)"),
    ("run", ["loop.rounds=0"], "key 'loop.rounds' = 0 is not allowed (expected >= 1)"),
    ("run", ["loop.init=last"], "key 'loop.init' = 'last' is not allowed (expected one of 'base', 'previous')"),
    ("run", ["loop.rounds=7"], "config key 'loop.rounds': 7 rounds need at least 7 unlabelled inputs (the pool has 6"),
    ("generate", ["loop.rounds=2"], "config key 'loop.rounds': 2 rounds run with `s2d run`"),
    ("generate", ["loop.round_size=2"], "config key 'loop.round_size': rounds over a stream run with `s2d run`"),
    ("run", ["loop.rounds=2", "loop.round_size=4"], "config key 'loop.round_size': 2 rounds of 4 inputs need 8 "
                                                    "unlabelled inputs; the stream has 6 (round 2 would have 2)"),
    ("run", ["eval.routers=(votes,)"], "key 'eval.routers'"),
    ("run", ["teacher.path=/no/teacher"], "config key 'teacher.path': /no/teacher: no such file or directory"),
    ("run", ["teacher.preset=huge", "teacher.tokenizer=bytes"], "key 'teacher.preset': 'huge' is not a preset"),
    ("run", ["teacher.preset=tiny"], "key 'teacher.tokenizer': a preset teacher needs a tokenizer"),
])
def test_bad_route_loop_and_teacher_values_are_one_line_errors(tmp_path, stage, overrides, message, capsys):
    code = main([stage, *TINY, "--workdir", str(tmp_path), "--config.pretrain.steps=0",
                 *[f"--config.{o}" for o in overrides]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "rounds")


@pytest.mark.parametrize("name", sorted(p.name for p in __import__("pathlib").Path("configs").glob("*.py")
                                        if p.name not in ("smollm2.py",)))
def test_every_shipped_config_takes_rounds_a_router_and_a_teacher(name):
    """A user turns any config into relegation with keys alone: three rounds, the agreement router, a teacher."""
    config = load_config(f"configs/{name}", ["loop.rounds=3", "route.method=agreement",
                                             "teacher.path=meta-llama/Llama-3.1-70B-Instruct"])
    assert config.loop.rounds == 3 and config.teacher.path.endswith("70B-Instruct")


def test_a_workdir_made_before_these_keys_keeps_working_and_rounds_do_not_grow(tmp_path):
    from s2d_jax.errors import S2DError
    from s2d_jax.workdir import keep_config

    keep_config(load_config("configs/tiny.py"), str(tmp_path))
    kept = json.load(open(tmp_path / "config.json"))
    for key in ("route", "loop", "teacher"):
        del kept[key]
    (tmp_path / "config.json").write_text(json.dumps(kept))
    keep_config(load_config("configs/tiny.py"), str(tmp_path))  # absent keys count at their defaults
    with pytest.raises(S2DError, match="key 'route.method': 'none' there, 'agreement' now"):
        keep_config(load_config("configs/tiny.py", ["route.method=agreement"]), str(tmp_path))
    rounds = tmp_path / "rounds"
    rounds.mkdir()
    keep_config(load_config("configs/tiny.py", ["loop.rounds=2"]), str(rounds))
    with pytest.raises(S2DError, match="train.steps may not change in a workdir of rounds"):
        keep_config(load_config("configs/tiny.py", ["loop.rounds=2", "train.steps=20"]), str(rounds))


def test_the_routed_system_as_a_harness_model_answers_as_eval_routes(reference, tmp_path):
    """`s2d eval --harness` with the routed system, in round 2 of the rounds run: a task YAML over eval's own
    held-out inputs (their ids key the router's samples) gets, input by input, the answer eval's routed system
    gives: System 1's where its agreement reaches route.threshold, System 2's elsewhere."""
    from s2d_jax.stages.inputs import load_eval_inputs, system1_prompt
    from s2d_jax.system2.tasks import get_task

    config = load_config("configs/tiny.py", [a.split("--config.")[1] for a in ROUNDS[2:]])
    task, examples = load_eval_inputs(config)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "inputs.jsonl").write_text("".join(json.dumps({"id": e.id, "prompt": system1_prompt(config, task, e),
                                                            "answer": e.label}) + "\n" for e in examples))
    (tasks / "s2d_routed.yaml").write_text(
        "task: s2d_routed\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: " + json.dumps(str(
            tasks / "inputs.jsonl")) + "}\ntest_split: test\noutput_type: generate_until\ndoc_to_text: \"{{prompt}}\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs: {until: [], max_gen_toks: 8, do_sample: false}\n"
        "metric_list: [{metric: exact_match}]\n")
    two = reference / "rounds" / "2"
    assert main(["eval", *ROUNDS, "--workdir", str(two), "--harness", "s2d_routed", "--config.eval.harness.systems=routed",
                 f"--config.eval.harness.include_path={tasks}"]) == 0
    rows = {json.loads(x)["id"]: json.loads(x) for x in open(two / "eval_inputs.jsonl")}
    threshold = config.route.threshold
    want = [rows[e.id]["system2" if routing.escalated(rows[e.id]["router"]["confidence"], threshold) else "router"]
            ["answer"] for e in examples]
    got = {r["doc_id"]: get_task("last_letters").parse(r["response"]) for r in map(json.loads, open(
        two / "harness_samples.jsonl"))}
    assert [got[k] for k in range(len(examples))] == want
    decisions = json.load(open(two / "harness.json"))["meta"]["routed"]
    assert decisions["escalated"] == sum(routing.escalated(rows[e.id]["router"]["confidence"], threshold)
                                         for e in examples) and decisions["requests"] == len(examples)


def test_eval_reports_the_routers_calibration(reference):
    two = reference / "rounds" / "2"
    rows = [json.loads(x)["router"] for x in open(two / "eval_inputs.jsonl")]
    results = json.load(open(two / "eval.json"))
    assert results["routed"]["calibration"] == routing.calibration(rows)
    assert "Router calibration on the held-out inputs" in (two / "report.md").read_text()


def test_the_probe_learns_a_separable_signal_and_picks_its_layer():
    """On constructed features where only layer 2 carries the target, the probe chooses layer 2 by validation and
    ranks held-out rows almost perfectly; its save/load round trip predicts the same; a probe saved for another
    System 1 is refused in one line."""
    import numpy as np

    from s2d_jax.errors import S2DError
    from s2d_jax.relegation import probe

    rng = np.random.default_rng(0)
    n, layers, width = 400, 4, 6
    y = (rng.random(n) < 0.4).astype(np.float32)
    x = rng.normal(size=(n, layers, width)).astype(np.float32)
    x[:, 2, 0] += 3.0 * (2 * y - 1)  # the signal, in layer 2 only
    ids = [f"in-{k}" for k in range(n)]
    fit = probe.train(x, y, ids)
    assert fit["layer"] == 2 and fit["validation"] > 0.95
    fresh = rng.normal(size=(200, layers, width)).astype(np.float32)
    t = (rng.random(200) < 0.4).astype(np.float32)
    fresh[:, 2, 0] += 3.0 * (2 * t - 1)
    rows = [{"confidence": float(p), "correct": bool(k)} for p, k in zip(probe.predict(fit, fresh[:, 2]), t)]
    assert routing.calibration(rows)["auroc"] > 0.95
    import tempfile

    with tempfile.TemporaryDirectory() as where:
        probe.save(fit, where, {"system1": "rounds/1/model", "round": 1})
        back = probe.load(where, "rounds/1/model", layers - 1)
        assert np.allclose(probe.predict(back, fresh[:, 2]), probe.predict(fit, fresh[:, 2]))
        with pytest.raises(S2DError, match="a probe trained on System 1 'rounds/1/model', not on 'rounds/2/model'"):
            probe.load(where, "rounds/2/model", layers - 1)


PROBE = [*TINY, "--config.route.method=probe", "--config.route.probe_holdout=0.5", "--config.loop.rounds=2",
         "--config.task.n=12", "--config.generate.chunk=2"]


def test_the_probe_router_trains_each_round_and_routes_the_next(tmp_path):
    """Round 1's System 1 (the base) has no probe: every pool input goes to System 2. Each round with a distilled
    model trains a probe on it (router/) from the examples kept out of its training, and round 2's route reads
    round 1's: its confidences are that probe's on round 1's model; eval reports the probe's calibration."""
    from s2d_jax import evaluate
    from s2d_jax.build import build_model, build_tokenizer
    from s2d_jax.relegation import probe
    from s2d_jax.stages.inputs import load_inputs, system1_prompt
    from s2d_jax.stages.run import round_config

    tiny_base(tmp_path)
    assert main(["run", *PROBE, "--workdir", str(tmp_path)]) == 0
    one, two = tmp_path / "rounds" / "1", tmp_path / "rounds" / "2"
    assert json.load(open(one / "route_report.json"))["escalated_share"] == 1.0
    assert (one / "model").exists(), "the tiny loop distils something in round 1"
    meta = json.load(open(one / "router" / "probe.json"))
    held = len(list(open(one / "train.jsonl"))) - len(list(open(one / "train_fit.jsonl")))
    assert meta["system1"] == "rounds/1/model" and meta["examples"] == held  # the model never trained on them
    config = load_config("configs/tiny.py", [a.split("--config.")[1] for a in PROBE[2:]])
    config2 = round_config(config, 2, 12)
    task, examples = load_inputs(config2)
    model, tok = build_model(config, path=str(one / "model"), sampling=True), build_tokenizer(config, str(two))
    rows, _ = evaluate.router(model, tok, task, examples, method="probe", prompt=lambda e: system1_prompt(
        config, task, e), max_new_tokens=config.eval.max_new_tokens, probe=probe.load(str(one), "rounds/1/model",
                                                                                        model.cfg.num_layers))
    routed = [json.loads(x) for x in open(two / "route.jsonl")]
    assert [r["id"] for r in routed] == [e.id for e in examples]
    assert [r["confidence"] for r in routed] == pytest.approx([r["confidence"] for r in rows], abs=1e-5)
    results = json.load(open(two / "eval.json"))
    assert results["routed"]["method"] == "probe" and "auroc" in results["routed"]["calibration"]
