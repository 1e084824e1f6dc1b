"""The self-routing System 1 (`route.method=self`): its confidence, the marker targets it learns from (what the
distilled model said on the examples it was kept from), and routing by the marker in the next round."""

import json
import math

import pytest

from conftest import tiny_base
from s2d_jax.cli import main
from s2d_jax.config import load_config
from s2d_jax.relegation import marker

SELF = ["--config", "configs/tiny.py", "--config.route.method=self", "--config.route.probe_holdout=0.5",
        "--config.task.n=12", "--config.route.self_steps=4", "--config.eval.routers=logprob"]


def test_the_marker_confidence_follows_the_marker_up_to_its_threshold():
    half = [math.log(0.5)] * 2
    assert marker.confidence("<think>", half, "<think>") == 0.0
    assert marker.confidence("  <think> more", half, "<think>") == 0.0  # leading space is not an answer
    assert marker.confidence("ab", half, "<think>") == pytest.approx(0.75 + 0.25 * 0.5)
    assert marker.confidence("ab", [], "<think>") == marker.FOLLOW  # unmarked stays at the threshold: kept
    assert marker.confidence("ab", half, None) == 0.0  # never taught the marker: every input escalates
    rows = [{"id": "a", "prompt": "p", "target": "xy"}, {"id": "b", "prompt": "q", "target": "zz"},
            {"id": "c", "prompt": "r", "target": "uv"}]
    out = marker.self_targets(rows, ["xy", "zy", ""], lambda t: t or None, "<think>")
    assert [(r["target"], r["marked"], r["system1"]) for r in out] == [
        ("xy", False, "xy"), ("<think>", True, "zy"), ("<think>", True, "")]


def test_the_self_router_learns_the_marker_where_it_was_wrong_and_routes_by_it(tmp_path):
    """The pool's route (the base, never taught the marker) escalates every input. The distilled model answers the
    held-out examples; those it answered unlike System 2 are trained on with the marker as their target, the others
    with their answer, beside every fitted example. Eval's routed system asks the final model: confidence 0 where
    it answers with the marker, else at least the marker threshold; eval sweeps it beside logprob. (The next round's
    route reads the distilled model through the same `router_state` as eval.)"""
    from s2d_jax import evaluate
    from s2d_jax.build import build_model, build_tokenizer
    from s2d_jax.sampling import Sampler
    from s2d_jax.stages.inputs import load_eval_inputs, system1_prompt
    from s2d_jax.system2.tasks import get_task
    from s2d_jax.train import Trainer

    tiny_base(tmp_path)
    assert main(["run", *SELF, "--workdir", str(tmp_path)]) == 0
    assert json.load(open(tmp_path / "route_report.json"))["escalated_share"] == 1.0
    read = lambda name: [json.loads(x) for x in open(tmp_path / name)]
    pooled, fit, taught = read("distill.jsonl"), read("train_fit.jsonl"), read("self/train.jsonl")
    held = taught[len(fit):]
    assert taught[:len(fit)] == fit and held, "the tiny loop keeps examples for both phases"
    assert {r["id"] for r in held} == {r["id"] for r in pooled} - {r["id"] for r in fit}
    task, given = get_task("last_letters"), {r["id"]: r["target"] for r in pooled}
    for r in held:
        wrong = task.parse(r["system1"]) is None or task.parse(r["system1"]) != task.parse(given[r["id"]])
        assert r["marked"] == wrong and r["target"] == ("<think>" if wrong else given[r["id"]])
    assert read("self/metrics.jsonl")[-1]["step"] == 4

    # what the held-out examples were answered with is the first phase's model (its last checkpoint) answering them
    config = load_config("configs/tiny.py", [a.split("--config.")[1] for a in SELF[2:]])
    first = build_model(config, workdir=str(tmp_path), trainable=True)
    tok = build_tokenizer(config, str(tmp_path))
    Trainer(first, tok, config, str(tmp_path), chat=config.program.chat, data=str(tmp_path / "train_fit.jsonl")).fit()
    said = Sampler(first, tok, max_batch=config.generate.max_batch).generate(
        [r["prompt"] for r in held], max_new_tokens=config.eval.max_new_tokens, chat=config.program.chat,
        progress=False)
    assert [s.text for (s,) in said] == [r["system1"] for r in held]

    # eval's routed system is the final model asked for its answer or its marker
    task, examples = load_eval_inputs(config)
    model = build_model(config, path=str(tmp_path / "model"), sampling=True)
    rows, _ = evaluate.router(model, tok, task, examples, method="self", marker="<think>",
                              max_new_tokens=config.eval.max_new_tokens,
                              prompt=lambda e: system1_prompt(config, task, e))
    scored = read("eval_inputs.jsonl")
    assert [r["router"]["confidence"] for r in scored] == pytest.approx([r["confidence"] for r in rows], abs=1e-5)
    for r in rows:
        asked = r["text"].lstrip().startswith("<think>")
        assert (r["confidence"] == 0.0) == asked and (asked or r["confidence"] >= marker.FOLLOW)
        assert r["answer"] is None or not asked
    results = json.load(open(tmp_path / "eval.json"))
    assert results["routed"]["method"] == "self" and set(results["routers"]) == {"self", "logprob"}
    assert results["routed"]["escalated_n"] == sum(r["confidence"] < config.route.threshold for r in rows)
