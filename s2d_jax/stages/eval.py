"""Stage `eval`: System 1, System 2 and the distilled System 1 on the held-out split; `eval.json` and the report."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

from ml_collections import ConfigDict

from s2d_jax import distributed
from s2d_jax.artifacts import read_jsonl, write_atomic
from s2d_jax.build import build_mesh, build_model, build_tokenizer
from s2d_jax.errors import S2DError
from s2d_jax.stages.inputs import load_eval_inputs, program_args, system1_instruction, system1_prompt, with_swapped
from s2d_jax.system2.programs import get_program

log = logging.getLogger("s2d")


def evaluate_stage(config: ConfigDict, workdir: str) -> str:
    """Stage `eval`: System 1 (the base model, direct), System 2 (the program) and the distilled System 1 (`model/`)
    on the held-out split; writes `eval.json`, then `report.md` and `report.png`."""
    from s2d_jax import evaluate
    from s2d_jax.report import write_report

    out = os.path.join(workdir, "eval.json")
    if os.path.exists(out):
        log.info("%s is complete; skipping eval", out)
        return out
    distilled_dir = os.path.join(workdir, "model")
    kept_none = nothing_kept(workdir)
    if not os.path.exists(distilled_dir) and not kept_none:
        raise S2DError(f"{distilled_dir}: no such directory (run `s2d train` first)")
    task, examples = load_eval_inputs(config)
    if task.swap(examples[0]) is not None:  # judging: both orders, for position inconsistency
        examples = with_swapped(task, examples)
    program = get_program(config.program.name)
    mesh, tok = build_mesh(config), build_tokenizer(config, workdir)
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
    base = build_model(config, mesh, workdir)
    instruction = system1_instruction(config)
    results = {"meta": {"task": task.name, "program": program.name, "model": config.model.path or config.model.preset,
                        "eval_inputs": len(examples), "system1_instruction": instruction or "(none)",
                        "system1_tokens": budget, "system2_budgets": args["budgets"], "samples": e.samples,
                        "variants": list(e.variants)}}
    log.info("eval: System 1 (base) on %d inputs", len(examples))
    results["system1"] = _with_variants(functools.partial(evaluate.system1, base, tok, task, **one), examples,
                                        variants)
    log.info("eval: System 2 (%s)", program.name)
    results["system2"] = _with_variants(functools.partial(evaluate.system2, program, base, tok, task, **two),
                                        examples, variants)
    del base
    if kept_none:  # an honest report of a run whose filter kept nothing: there is no distilled model
        results["distilled"] = None
        results["meta"]["note"] = ("No input passed the self-consistency filter, so nothing was distilled: the "
                                   "base model's System 2 answers never agreed often enough (see the filter line).")
    else:
        distilled = build_model(config, mesh, path=distilled_dir)
        log.info("eval: distilled System 1")
        results["distilled"] = _with_variants(functools.partial(evaluate.system1, distilled, tok, task, **one),
                                              examples, variants)
    reference = task.reference(examples)
    if reference:
        results["reference"] = reference
    report_path = os.path.join(workdir, "filter_report.json")
    if os.path.exists(report_path):
        with open(report_path) as f:
            results["filter"] = json.load(f)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        rows = [r for r in read_jsonl(metrics_path) if "loss" in r]
        results["train"] = rows[-1] if rows else None
    if distributed.primary():  # on several hosts, one writes (each host timed its own share of the work)
        write_report(results, workdir)
        write_atomic(out, json.dumps(results, indent=2) + "\n")
    distributed.barrier(f"eval {workdir}")
    for name in ("system1", "system2", "distilled"):
        r = results[name]
        if r is None:
            log.warning("%-9s none: the filter kept no input, nothing was distilled", name)
            continue
        log.info("%-9s accuracy %5.1f%%  generated tokens / input %7.1f  FLOPs / input %.3g  s / input %.2f", name,
                 100 * r["accuracy"], r["generated_tokens"], r["flops"], r["seconds"])
    log.info("wrote %s, %s, %s", out, os.path.join(workdir, "report.md"), os.path.join(workdir, "report.png"))
    return out


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
