"""Stage `filter`: self-consistency over each input's samples; the kept inputs become `distill.jsonl`."""

from __future__ import annotations

import collections
import json
import logging
import os

from ml_collections import ConfigDict

from s2d_jax import trackers
from s2d_jax.runtime import faults
from s2d_jax.artifacts import write_atomic
from s2d_jax.build import build_generation_mesh, build_system2
from s2d_jax.errors import S2DError
from s2d_jax.sampling import Sampler
from s2d_jax.stages.generate import read_rollouts, rollout_path
from s2d_jax.stages.inputs import system1_prompt, system1_target
from s2d_jax.system2.filters import FilterReport, first_sample, order_swap, usc, usc_select, vote
from s2d_jax.system2.programs import stage_truncation
from s2d_jax.system2.tasks import Example, get_task
from s2d_jax.system2.tasks.judge import SWAP_SUFFIX

log = logging.getLogger("s2d")

FILTERS = ("majority", "order_swap", "usc", "none")


def filter(config: ConfigDict, workdir: str) -> str:  # noqa: A001 (the stage's name)
    """Stage `filter`: self-consistency over each input's samples (`filter.name`: majority vote, order-swap
    consistency for pairwise judging, USC for free-form answers, or none, the ablation); the kept inputs become
    `distill.jsonl` (System 1 prompt -> the consistent answer, or with `filter.target=response` the chosen
    sample's final response) and the decisions are summed in `filter_report.json`, with each stage's truncation
    rate (the share of samples that hit the stage's budget)."""
    name = config.filter.name
    if name not in FILTERS:
        raise S2DError(f"config key 'filter.name': unknown filter {name!r} (filters: {', '.join(FILTERS)})")
    out = os.path.join(workdir, "distill.jsonl")
    if os.path.exists(out):
        log.info("%s is complete; skipping filter", out)
        return out
    source = rollout_path(workdir)
    task = get_task(config.task.name)
    grouped: dict[str, list[dict]] = collections.OrderedDict()
    for row in read_rollouts(config, workdir):
        grouped.setdefault(row["id"], []).append(row)
    for rows in grouped.values():
        rows.sort(key=lambda r: r["sample"])
    answers = {key: [r["answer"] for r in rows] for key, rows in grouped.items()}
    keys = [k for k in grouped if not k.endswith(SWAP_SUFFIX)]
    if name == "order_swap":
        unpaired = [k for k in keys if k + SWAP_SUFFIX not in grouped]
        if unpaired:
            raise S2DError(f"{source}: input {unpaired[0]!r} has no swapped twin {unpaired[0] + SWAP_SUFFIX!r} "
                           f"(generate with filter.name=order_swap to judge both orders)")
        decisions = [order_swap(answers[k], answers[k + SWAP_SUFFIX], config.filter.min_share) for k in keys]
    elif name == "usc":
        decisions = _usc_decisions(config, [grouped[k] for k in keys], workdir)
    elif name == "none":
        decisions = [first_sample(answers[k]) for k in keys]
    else:  # vote-aware sampling's "decided" rule stopped only where the vote over all N could not change
        total = config.generate.samples if config.generate.adaptive == "decided" else None
        decisions = [vote(answers[k], config.filter.min_share, total) for k in keys]
    as_response = config.filter.target == "response" or (config.filter.target == "auto" and name == "usc")
    report, lines = FilterReport(), []
    for key, decision in zip(keys, decisions):
        report.add(decision)
        if decision.reason is None:
            prompt = system1_prompt(config, task, Example(key, grouped[key][0]["input"]))
            chosen = grouped[key][decision.sample]
            target = (chosen["stages"][-1]["output"].strip() if as_response and chosen.get("stages")
                      else system1_target(config, task, decision.answer))
            votes = dict(collections.Counter(a for a in answers[key] if a is not None).most_common())
            lines.append(json.dumps({"id": key, "prompt": prompt, "target": target, "votes": votes,
                                     "agreement": decision.share}))
    summary = {"filter": name, "min_share": config.filter.min_share, "target": "response" if as_response else
               "answer", **report.to_dict(), "truncation": stage_truncation([r for g in grouped.values() for r in g])}
    if config.generate.adaptive != "off":
        summary["adaptive"] = adaptive_report(config, [grouped[k] for k in keys])
    faults.point("filter")
    write_atomic(os.path.join(workdir, "filter_report.json"), json.dumps(summary, indent=2) + "\n")
    trackers.log(workdir, "filter", summary)
    write_atomic(out, "".join(line + "\n" for line in lines))
    log.info("kept %d of %d inputs (%.0f%%); drops: %s", report.kept, report.total, 100 * report.kept_fraction,
             dict(report.drops) or "none")
    return out


def _usc_decisions(config: ConfigDict, groups: list[list[dict]], workdir: str):
    """USC: one greedy sampler call per input asks the model for the most consistent of its N final outputs."""
    mesh = build_generation_mesh(config)
    sampler = Sampler(*build_system2(config, mesh, workdir), mesh=mesh, max_batch=config.generate.max_batch,
                      cache_dtype=config.generate.cache_dtype or None)
    picks = usc_select(sampler, groups, config.program.chat, progress=True)
    return [usc(pick, [r["answer"] for r in rows]) for (pick, _), rows in zip(picks, groups)]


def adaptive_report(config: ConfigDict, groups: list[list[dict]]) -> dict:
    """Vote-aware sampling's savings: samples drawn per input (mean, histogram) and the tokens the undrawn samples
    would have cost (each input's mean tokens per drawn sample times its undrawn samples: an estimate)."""
    n = config.generate.samples
    used = [len(rows) for rows in groups]
    saved = sum((n - len(rows)) * sum(r.get("num_tokens", 0) for r in rows) / len(rows) for rows in groups)
    drawn = sum(r.get("num_tokens", 0) for rows in groups for r in rows)
    return {"rule": config.generate.adaptive, "wave": config.generate.adaptive_wave, "samples": n,
            "samples_mean": sum(used) / max(len(used), 1),
            "samples_histogram": {str(k): used.count(k) for k in sorted(set(used))},
            "tokens_generated": drawn, "tokens_saved": round(saved, 1),
            "tokens_saved_fraction": saved / max(saved + drawn, 1e-9)}
