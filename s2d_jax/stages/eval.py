"""Stage `eval`: System 1, System 2 and the distilled System 1 on the held-out split, and with a router the routed
system and its accuracy-against-cost sweep; `eval.json`, `eval_inputs.jsonl` and the report."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

from ml_collections import ConfigDict

from s2d_jax import trackers
from s2d_jax.runtime import distributed
from s2d_jax.relegation import routing, rounds
from s2d_jax.artifacts import read_jsonl, write_atomic
from s2d_jax.build import build_generation_mesh, build_model, build_system1, build_system2, build_tokenizer
from s2d_jax.errors import S2DError
from s2d_jax.stages.inputs import load_eval_inputs, program_args, system1_instruction, system1_prompt, with_swapped
from s2d_jax.stages.probe import train_probe
from s2d_jax.stages.route import model_name, router_args, router_state
from s2d_jax.stages.train import nothing_to_train
from s2d_jax.system2.programs import get_program

log = logging.getLogger("s2d")
PER_INPUT = "eval_inputs.jsonl"
SYSTEMS = ("system1", "system2", "distilled", "router")
KIND = {"system1": "direct", "distilled": "direct", "system2": "program", "router": "router"}  # what a row measures


def evaluate_stage(config: ConfigDict, workdir: str) -> str:
    """Stage `eval`: System 1 (the base model, or in a later round the previous round's distilled one; direct),
    System 2 (the program, run by the teacher if there is one) and the distilled System 1 (`model/`) on the
    held-out split; with `route.method`, the routed system at `route.threshold` and at every threshold of the sweep
    (System 1 there is the distilled model: the system this round leaves). Writes `eval.json`, `eval_inputs.jsonl`
    (each input's answers, correctness and cost per system), then `report.md` and `report.png`. A system an earlier
    round already scored (the same model on the same inputs) is read from that round, not run again."""
    from s2d_jax import evaluate
    from s2d_jax.report import write_report

    out = os.path.join(workdir, "eval.json")
    if os.path.exists(out):
        log.info("%s is complete; skipping eval", out)
        return out
    distilled_dir = os.path.join(workdir, "model")
    trained = os.path.exists(distilled_dir)
    if not trained and not nothing_to_train(config, workdir):
        raise S2DError(f"{distilled_dir}: no such directory (run `s2d train` first)")
    task, examples = load_eval_inputs(config)
    if task.swap(examples[0]) is not None:  # judging: both orders, for position inconsistency
        examples = with_swapped(task, examples)
    program = get_program(config.program.name)
    mesh, tok = build_generation_mesh(config), build_tokenizer(config, workdir)
    e, g = config.eval, config.generate
    budget = e.max_new_tokens or task.answer_tokens
    common = dict(chat=config.program.chat, mesh=mesh, max_batch=g.max_batch, cache_dtype=g.cache_dtype or None)
    args = program_args(config, task)
    one = dict(prompt=lambda x: system1_prompt(config, task, x), max_new_tokens=budget, **common)
    two = dict(samples=e.samples, seed=config.seed, budgets=args["budgets"], params=args["params"],
               select="usc" if config.filter.name == "usc" else "majority", temperature=g.temperature,
               top_k=g.top_k or None, top_p=g.top_p if g.top_p < 1 else None, **common)
    variants = {name: [dataclasses.replace(x, input=task.VARIANTS[name](x.input)) for x in examples]
                for name in e.variants}
    t = config.teacher
    models = {"system1": model_name(workdir), "system2": f"teacher {t.path or t.preset}" if t.path or t.preset
              else "base", "distilled": os.path.relpath(distilled_dir, rounds.root(workdir)) if trained else None}
    models["router"] = models["distilled"] or models["system1"]
    info = rounds.info(workdir) or {}
    results = {"meta": {"task": task.name, "program": program.name, "model": config.model.path or config.model.preset,
                        "eval_inputs": len(examples), "system1_instruction": system1_instruction(config) or "(none)",
                        "system1_tokens": budget, "system2_budgets": args["budgets"], "samples": e.samples,
                        "variants": list(e.variants), "models": models, **({"round": info["round"]} if info else {})}}
    earlier = _earlier_results(workdir)

    def score(name: str, build, run) -> None:
        """`results[name]`: read from an earlier round that scored the same model, else run."""
        found = earlier.get((KIND[name], models[name]))
        if found is not None:
            log.info("eval: %s (%s) as scored in an earlier round", name, models[name])
            results[name] = found
            return
        model, tokenizer = build()
        log.info("eval: %s (%s) on %d inputs", name, models[name], len(examples))
        results[name] = run(model, tokenizer)

    score("system1", lambda: build_system1(config, mesh, workdir), lambda m, k: _with_variants(
        functools.partial(evaluate.system1, m, k, task, **one), examples, variants))
    score("system2", lambda: build_system2(config, mesh, workdir), lambda m, k: _with_variants(
        functools.partial(evaluate.system2, program, m, k, task, **two), examples, variants))
    if trained:
        score("distilled", lambda: (build_model(config, mesh, path=distilled_dir, sampling=True), tok), lambda m, k: _with_variants(
            functools.partial(evaluate.system1, m, k, task, **one), examples, variants))
    else:  # an honest report of a round whose filter kept nothing: there is no distilled model
        results["distilled"] = None
        results["meta"]["note"] = ("No input passed the self-consistency filter, so nothing was distilled: the "
                                   "base model's System 2 answers never agreed often enough (see the filter line).")
    if config.route.method != "none" or config.eval.routers:
        router_model = (lambda: (build_model(config, mesh, path=distilled_dir, sampling=True), tok)) if trained else \
            (lambda: build_system1(config, mesh, workdir))
        train_probe(config, workdir)  # with a probe router: this round's probe, unless `run` trained it
        router_dir = distilled_dir if trained else rounds.system1_path(workdir)

        def routed_system1(method: str):
            return lambda m, k: evaluate.routed_system1(m, k, task, examples, **{
                **router_args(config, task, mesh), "method": method,
                **router_state(config, router_dir, models["router"], m, method)})

        if config.route.method != "none":
            score("router", router_model, routed_system1(config.route.method))
            _routed(config, results)
        _frontier(config, results, router_model, routed_system1)
    reference = task.reference(examples)
    if reference:
        results["reference"] = reference
    _attach_artifacts(results, workdir)
    per_input = _per_input(results, examples)
    if distributed.primary():  # on several hosts, one writes (each host timed its own share of the work)
        write_atomic(os.path.join(workdir, PER_INPUT), "".join(json.dumps(r, default=str) + "\n" for r in per_input))
        write_report(results, workdir)
        write_atomic(out, json.dumps(results, indent=2, default=str) + "\n")
    trackers.log(workdir, "eval", {k: v for k, v in results.items() if k not in ("filter", "train")})
    distributed.barrier(f"eval {workdir}")
    for name in ("system1", "system2", "distilled", "routed"):
        r = results.get(name, False)
        if r is None:
            log.warning("%-9s none: the filter kept no input, nothing was distilled", name)
        elif r:
            log.info("%-9s accuracy %5.1f%%  generated tokens / input %7.1f  FLOPs / input %.3g  s / input %.2f%s",
                     name, 100 * r["accuracy"], r["generated_tokens"], r["flops"], r["seconds"],
                     f"  escalated {100 * r['escalated']:.0f}%" if "escalated" in r else "")
    log.info("wrote %s, %s, %s", out, os.path.join(workdir, "report.md"), os.path.join(workdir, "report.png"))
    return out


def _routed(config: ConfigDict, results: dict) -> None:
    """The routed system at `route.threshold` and the sweep, from the router's and System 2's per-input rows."""
    one, two = results["router"], results["system2"]
    seconds = (one["seconds_total"], two["seconds_total"])
    results["routed"] = {**routing.routed(one["per_input"], two["per_input"], config.route.threshold, seconds),
                         "method": config.route.method, "system1": results["meta"]["models"]["router"],
                         "calibration": routing.calibration(one["per_input"])}
    results["sweep"] = routing.sweep(one["per_input"], two["per_input"], routing.thresholds(config.route), seconds)


def _frontier(config: ConfigDict, results: dict, router_model, routed_system1) -> None:
    """`results["routers"]`: every router swept on the held-out inputs (`route.method` and `eval.routers`), each
    with its calibration, its own cost per input and its accuracy-vs-cost sweep, for one plot and one table."""
    methods = [m for m in dict.fromkeys((config.route.method, *config.eval.routers)) if m != "none"]
    if len(methods) < 2 and not config.eval.routers:
        return
    two = results["system2"]
    model = None
    out = {}
    for method in methods:
        if method == config.route.method:
            one = results["router"]
        else:
            if model is None:
                model = router_model()
            log.info("eval: router %s (%s) on %d inputs, for the frontier", method, results["meta"]["models"]["router"],
                     len(two["per_input"]))
            one = routed_system1(method)(*model)
        seconds = (one["seconds_total"], two["seconds_total"])
        out[method] = {"router": {k: one[k] for k in ("generated_tokens", "prompt_tokens", "flops", "accuracy")},
                       "calibration": routing.calibration(one["per_input"]),
                       "sweep": routing.sweep(one["per_input"], two["per_input"],
                                              routing.thresholds(config.route), seconds)}
    results["routers"] = out


def _per_input(results: dict, examples) -> list[dict]:
    """eval_inputs.jsonl's rows: each input's label and every system's answer, correctness and cost; the per-input
    lists leave the systems' rows in eval.json."""
    rows = [{"id": x.id, "label": x.label} for x in examples]
    for name in SYSTEMS:
        for row, r in zip(rows, (results.get(name) or {}).pop("per_input", None) or ()):
            row[name] = {k: v for k, v in r.items() if k != "id"}
    return rows


def _earlier_results(workdir: str) -> dict:
    """(kind, model name) -> its scores (with per-input rows) in an earlier round of this workdir's loop."""
    info = rounds.info(workdir)
    found = {}
    for r in range(1, info["round"]) if info else ():
        where = rounds.round_dir(rounds.root(workdir), r)
        path = os.path.join(where, "eval.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            results = json.load(f)
        per_input = read_jsonl(os.path.join(where, PER_INPUT), ("id",))
        for name, model in results["meta"].get("models", {}).items():
            if model and results.get(name):
                rows = [{"id": p["id"], **p[name]} for p in per_input]
                found[(KIND[name], model)] = {**results[name], "per_input": rows}
    return found


def _attach_artifacts(results: dict, workdir: str) -> None:
    """What the report says beside the scores: the router's and the filter's reports, training's last row."""
    for key, name in (("route", "route_report.json"), ("filter", "filter_report.json")):
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            with open(path) as f:
                results[key] = json.load(f)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        rows = [r for r in read_jsonl(metrics_path) if "loss" in r]
        results["train"] = rows[-1] if rows else None


def _with_variants(run, examples, variants: dict) -> dict:
    """A system's scores on the held-out inputs, plus its accuracy on each perturbed copy of them."""
    out = run(examples)
    for name, perturbed in variants.items():
        log.info("eval: variant %s", name)
        out[f"variant_{name}"] = run(perturbed)["accuracy"]
    return out


def nothing_kept(workdir: str) -> bool:
    """True when `filter` ran and kept no input (an empty `distill.jsonl`)."""
    path = os.path.join(workdir, "distill.jsonl")
    return os.path.exists(path) and os.path.getsize(path) == 0
