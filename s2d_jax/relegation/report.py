"""The rounds' report of a relegation loop (`loop.rounds` > 1): `rounds.json` (one row per round), `report.md` (the
table) and `rounds.png` (accuracy and escalated share over rounds) in the workdir, from each round's artifacts."""

from __future__ import annotations

import json
import os
import re

from ml_collections import ConfigDict

from s2d_jax import trackers
from s2d_jax.runtime import distributed
from s2d_jax.relegation import rounds
from s2d_jax.artifacts import read_jsonl, write_atomic
from s2d_jax.report import COLORS, save_percent_plot

ACCURACY = ("system1", "system2", "distilled", "routed")


def round_row(workdir: str, r: int) -> dict:
    """What round r did and how its systems scored."""
    where = rounds.round_dir(workdir, r)
    results, pool, kept = (_json(os.path.join(where, name)) for name in ("eval.json", "route_report.json",
                                                                          "filter_report.json"))
    rollouts = [x for name in sorted(os.listdir(where)) if re.fullmatch(r"rollouts(-\d{5}-of-\d{5})?\.jsonl", name)
                for x in read_jsonl(os.path.join(where, name), empty_ok=True)]  # one file, or a shard per host
    escalated_inputs = len({x["id"] for x in rollouts})
    tokens = sum(x.get("num_tokens", 0) for x in rollouts)
    row = {"round": r, "system1_model": results["meta"]["models"]["system1"], "pool": pool["inputs"] if pool else
           kept["total"] if kept else escalated_inputs, "escalated": pool["escalated"] if pool else escalated_inputs,
           "system2_tokens": tokens, "kept": kept["kept"] if kept else 0}
    row["escalated_share"] = row["escalated"] / max(row["pool"], 1)
    row["skipped"] = row["pool"] - row["escalated"]
    # what skipping saved: the skipped inputs at the escalated inputs' mean System 2 cost (an estimate)
    row["system2_tokens_saved"] = row["skipped"] * tokens / escalated_inputs if escalated_inputs else None
    row["router_tokens"] = pool["router"]["generated_tokens"] if pool else 0
    path = os.path.join(where, "train.jsonl")
    row["train_examples"] = len(read_jsonl(path, empty_ok=True)) if os.path.exists(path) else row["kept"]
    for name in ACCURACY:
        s = results.get(name)
        row[name] = None if not s else {k: s[k] for k in ("accuracy", "generated_tokens", "flops") if k in s}
        if s and "escalated" in s:
            row[name]["escalated"] = s["escalated"]
    return row


def _json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def markdown(config: ConfigDict, rows: list[dict]) -> str:
    r = config.route
    lines = [f"# Relegation: {config.program.name} on {config.task.name}, {len(rows)} rounds", "",
             f"Each round takes the next {rows[0]['pool'] if rows else 0}-input slice of the unlabelled pool. System 1 "
             f"(round 1: the base model; then the previous round's distilled model) answers it; "
             + (f"inputs where its `{r.method}` confidence is below {r.threshold:g} are escalated to System 2"
                if r.method != "none" else "every input goes to System 2 (`route.method=none`)")
             + f"; the kept examples {'join every earlier round' if config.loop.accumulate else 'alone'}'s and the "
               f"model is fine-tuned from {'the base' if config.loop.init == 'base' else 'the previous round'}. "
               f"Accuracy on the held-out inputs (%), generated tokens and FLOPs per input:", "",
             "| round | System 1 | pool escalated | skipped (System 2 tokens saved, est.) | kept / trained on | "
             "System 1 | System 2 | distilled | routed | routed escalated | routed tokens / input | "
             "routed FLOPs / input |", "|" + "---|" * 12]
    for row in rows:
        acc = lambda name: "" if not row[name] else f"{100 * row[name]['accuracy']:.1f}"
        routed = row["routed"] or {}
        saved = "" if row["system2_tokens_saved"] is None else f" ({row['system2_tokens_saved']:.0f})"
        lines.append(
            f"| {row['round']} | {row['system1_model']} | {row['escalated']} / {row['pool']} "
            f"({100 * row['escalated_share']:.0f}%) | {row['skipped']}{saved} | {row['kept']} / "
            f"{row['train_examples']} | {acc('system1')} | {acc('system2')} | {acc('distilled')} | {acc('routed')} | "
            + (f"{100 * routed['escalated']:.0f}% | {routed['generated_tokens']:.1f} | {routed['flops']:.3g} |"
               if routed else " | | |"))
    lines += ["", "System 2 tokens saved: the skipped inputs at the escalated inputs' mean System 2 generated tokens "
                  "in that round (an estimate: the skipped inputs were not run). Each round's own report: "
                  "`rounds/R/report.md`; the curve over rounds: `rounds.png`."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [row["round"] for row in rows]
    for name in ACCURACY:
        ys = [100 * row[name]["accuracy"] if row[name] else None for row in rows]
        if any(y is not None for y in ys):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", color=COLORS[name], label=name)
    ax.plot(xs, [100 * row["escalated_share"] for row in rows], marker="s", linestyle="--", color="tab:gray",
            label="pool escalated (%)")
    if any(row["routed"] for row in rows):
        ax.plot(xs, [100 * row["routed"]["escalated"] if row["routed"] else float("nan") for row in rows],
                marker="^", linestyle=":", color="tab:red", label="routed: held-out escalated (%)")
    ax.set_xticks(xs)
    ax.set_xlabel("round")
    save_percent_plot(fig, ax, "%", "Accuracy and escalated share over rounds", path)


def write_rounds_report(config: ConfigDict, workdir: str) -> str:
    rows = [round_row(workdir, r) for r in range(1, config.loop.rounds + 1)]
    md = os.path.join(workdir, "report.md")
    if distributed.primary():
        plot(rows, os.path.join(workdir, "rounds.png"))
        write_atomic(os.path.join(workdir, "rounds.json"), json.dumps(rows, indent=2) + "\n")
        write_atomic(md, markdown(config, rows))
    for row in rows:
        trackers.log(workdir, "rounds", row, round=row["round"])
    return md
