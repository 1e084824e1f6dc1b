"""`report.md` (the paper-style table with each system's cost per input, what the filter kept, how training ended)
and `report.png` (accuracy against generated tokens per input, one point per system), both from `eval.json`; and
`s2d report WORKDIR...`: several runs side by side, with the paper's numbers (package data
`paper_results.json`, Yu et al. 2024's table) as a reference column."""

from __future__ import annotations

import json
import os
import re

from s2d_jax.artifacts import write_atomic
from s2d_jax.errors import S2DError

SYSTEMS = (("system1", "System 1 (base, direct)"), ("system2", "System 2 (program)"),
           ("distilled", "Distilled System 1"), ("routed", "Routed (System 1 where sure, else System 2)"))
COLORS = {"system1": "tab:blue", "system2": "tab:orange", "distilled": "tab:green", "routed": "tab:red"}
ROUTER_COLORS = {"agreement": "tab:purple", "logprob": "tab:brown", "probe": "tab:cyan", "self": "tab:olive"}  # the routers' curves
COST = (("accuracy", "accuracy (%)"), ("generated_tokens", "generated tokens / input"),
        ("prompt_tokens", "prompt tokens / input"), ("flops", "FLOPs / input"), ("seconds", "seconds / input"),
        ("n", "n"))
NOT_EXTRA = {k for k, _ in COST} | {"mean_tokens", "seconds_total", "truncation", "truncated", "name", "answers",
                                   "escalated", "escalated_n", "method", "system1", "threshold", "calibration"}
PAPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_results.json")  # the paper's table


def _fmt(key: str, value) -> str:
    if value is None:
        return ""
    if key == "flops":
        return f"{value:.3g}"
    if isinstance(value, float):
        return f"{value:.1f}" if key in ("generated_tokens", "prompt_tokens", "mean_tokens") else (
            f"{value:.2f}" if key == "seconds" else f"{100 * value:.1f}")
    return str(value)


def system_label(results: dict, name: str, default: str) -> str:
    """A system's label: System 1 names its model in a later round (the previous round's distilled one), System 2
    its teacher."""
    model = results.get("meta", {}).get("models", {}).get(name)
    if name == "system1" and model and model != "base":
        return f"System 1 ({model}, direct)"
    if name == "system2" and model and model != "base":
        return f"System 2 (program, {model})"
    return default


def _rows(results: dict):
    """(label, row or None, present) for each system, then the reference row a task gives (GPT-4 on MT-bench)."""
    for name, default in SYSTEMS:
        if name != "routed" or results.get(name):
            yield system_label(results, name, default), results.get(name), name in results
    ref = results.get("reference")
    if ref:
        yield f"Reference: {ref.get('name', 'reference')}", ref, True


def markdown(results: dict) -> str:
    meta = results.get("meta", {})
    title = " / ".join(str(meta[k]) for k in ("program", "task", "model") if meta.get(k))
    rows = list(_rows(results))
    extras = sorted({k for _, row, _ in rows for k in (row or {}) if k not in NOT_EXTRA})
    header = [label for _, label in COST] + [f"{k} (%)" for k in extras]
    lines = [f"# System 2 distillation: {title}" if title else "# System 2 distillation", "",
             "| system | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
    for label, row, present in rows:
        if row is None:
            if present:
                lines.append(f"| {label} | (none: nothing was distilled) |" + " |" * (len(header) - 1))
            continue
        cells = [label] + [_fmt(k, row.get(k)) for k, _ in COST] + [_fmt(k, row.get(k)) for k in extras]
        lines.append("| " + " | ".join(cells) + " |")
    s1, s2, d = (results.get(k) for k in ("system1", "system2", "distilled"))
    if s1 and s2 and d:
        lines += ["", f"Distilled System 1 vs System 2: {100 * (d['accuracy'] - s2['accuracy']):+.1f} points at "
                      f"{_tokens(d) / max(_tokens(s2), 1e-9):.3f}x its generated tokens per input; "
                      f"vs System 1: {100 * (d['accuracy'] - s1['accuracy']):+.1f} points."]
    lines += routed_lines(results)
    if meta.get("system1_tokens"):
        said = meta.get("system1_instruction", "(none)")
        lines += ["", "System 1 (base and distilled) is prompted with "
                      + ("the bare input" if said == "(none)" else f"the input followed by {said.strip()!r}")
                      + f", greedy, at most {meta['system1_tokens']} new tokens. System 2 budgets per stage: "
                      + ", ".join(f"{k} {v}" for k, v in meta.get("system2_budgets", {}).items())
                      + f"; {meta.get('samples', 1)} sample(s) per input."]
    spread = [(label, row["answers"]) for name, label in SYSTEMS if (row := results.get(name)) and row.get("answers")]
    if spread:
        lines += ["Most frequent answers: " + "; ".join(
            f"{label}: " + ", ".join(f"{a} {c}" for a, c in answers.items()) for label, answers in spread) + "."]
    cut = [(label, row["truncated"]) for name, label in SYSTEMS[::2] if (row := results.get(name))
           and "truncated" in row]
    if cut:
        lines += ["System 1 truncation (share of answers that hit the budget): "
                  + ", ".join(f"{label} {100 * v:.1f}%" for label, v in cut) + "."]
    if s2 and s2.get("truncation"):
        lines += ["System 2 truncation (share of calls that hit the budget): "
                  + ", ".join(f"{k} {100 * v:.1f}%" for k, v in s2["truncation"].items()) + "."]
    f = results.get("filter")
    if f:
        drops = ", ".join(f"{k} {v}" for k, v in f.get("drops", {}).items()) or "none"
        lines += ["", f"Filter `{f.get('filter', 'majority')}`: kept {f['kept']} of {f['total']} unlabelled inputs "
                      f"({100 * f['kept_fraction']:.1f}%); drops: {drops}."]
        a = f.get("adaptive")
        if a:
            lines += [f"Vote-aware sampling (`{a['rule']}`, waves of {a['wave']}): {a['samples_mean']:.2f} samples per "
                      f"input of {a['samples']}; about {a['tokens_saved']:.0f} generated tokens saved "
                      f"({100 * a['tokens_saved_fraction']:.1f}%)."]
        if f.get("truncation"):
            lines += ["Rollout truncation per stage: "
                      + ", ".join(f"{k} {100 * v:.1f}%" for k, v in f["truncation"].items()) + "."]
    t = results.get("train")
    if t:
        lines += [f"Training: {t.get('step')} steps, final loss {t.get('loss', float('nan')):.4f}, token accuracy "
                  f"{100 * t.get('accuracy', 0):.1f}%."]
    if meta.get("note"):
        lines += ["", meta["note"]]
    if any(k.startswith("agreement") for k in extras):
        lines += ["", "Agreement with humans as MT-bench computes it: each verdict against each expert vote on the "
                      "same question, turn and model pair; with ties, a tie verdict agrees with a tie vote; without "
                      "ties, pairs where either side is a tie are left out. Judged in both orders, a verdict that "
                      "does not mirror counts as a tie. Accuracy is agreement with the majority of the votes."]
    lines += ["", "Accuracy is on the held-out labelled split. Costs are per input: generated tokens count every "
                  "stage of every sample (maj@k costs k samples; USC's selection call is counted), prompt tokens "
                  "every call's prompt, FLOPs the forward matmuls of that work. Plots: `report.png` (accuracy vs "
                  "generated tokens), `report_flops.png` (vs FLOPs)."]
    return "\n".join(lines) + "\n"


def routed_lines(results: dict) -> list[str]:
    """What the router did: on the unlabelled pool (escalated, skipped) and on the held-out inputs (the routed
    system against System 2)."""
    lines = []
    pool = results.get("route")
    if pool:
        lines += ["", f"Router on the unlabelled pool (System 1 = {pool['system1']}, `{pool['method']}` >= "
                      f"{pool['threshold']:g}): escalated {pool['escalated']} of {pool['inputs']} inputs "
                      f"({100 * pool['escalated_share']:.1f}%) to System 2; {pool['skipped']} answered by System 1 "
                      f"and not distilled again."]
    r, s2 = results.get("routed"), results.get("system2")
    if r and s2:
        lines += [f"Routed system on the held-out inputs (System 1 = {r['system1']}, `{r['method']}` >= "
                  f"{r['threshold']:g}): {100 * r['escalated']:.1f}% escalated; accuracy "
                  f"{100 * (r['accuracy'] - s2['accuracy']):+.1f} points against System 2 at "
                  f"{_tokens(r) / max(_tokens(s2), 1e-9):.3f}x its generated tokens and "
                  f"{r['flops'] / max(s2['flops'], 1e-9):.3f}x its FLOPs per input (System 1's samples counted for "
                  f"every input, System 2's calls for the escalated ones; seconds apportion System 2's by FLOPs). "
                  f"The sweep over thresholds is the curve in `report.png`."]
        c = r.get("calibration")
        if c:
            auroc = "undefined (System 1 all right or all wrong)" if c["auroc"] is None else f"{c['auroc']:.3f}"
            lines += [f"Router calibration on the held-out inputs (does its confidence say when System 1 is right? "
                      f"{c['right']} of {c['n']} right): AUROC {auroc}, expected calibration error {c['ece']:.3f}."]
    return lines + router_table(results)


def router_table(results: dict) -> list[str]:
    """Every swept router (`results["routers"]`) in one table: its calibration, its own cost, and the cheapest
    point of its sweep within 1 point of System 2's accuracy (how cheaply it keeps System 2's answers)."""
    routers, s2 = results.get("routers"), results.get("system2")
    if not routers or not s2:
        return []
    lines = ["", f"Routers on the held-out inputs (System 1 = {results['meta']['models']['router']}; their curves "
                 f"over thresholds share `report.png`). Cost per input; the last columns: the cheapest threshold "
                 f"whose routed accuracy is within 1 point of System 2's ({100 * s2['accuracy']:.1f}%):", "",
             "| router | AUROC | ECE | router tokens / input | router FLOPs / input | threshold | routed accuracy "
             "(%) | escalated | routed tokens / input | vs System 2's tokens |", "|" + "---|" * 10]
    for method, r in routers.items():
        c, own = r["calibration"], r["router"]
        near = [p for p in r["sweep"] if p["accuracy"] >= s2["accuracy"] - 0.01]
        best = min(near, key=lambda p: (p["generated_tokens"], p["threshold"])) if near else None
        auroc = "" if c["auroc"] is None else f"{c['auroc']:.3f}"
        at = (f"{best['threshold']:g} | {100 * best['accuracy']:.1f} | {100 * best['escalated']:.0f}% | "
              f"{best['generated_tokens']:.1f} | {best['generated_tokens'] / max(_tokens(s2), 1e-9):.2f}x |"
              if best else "none within 1 point | | | | |")
        lines.append(f"| {method} | {auroc} | {c['ece']:.3f} | {own['generated_tokens']:.1f} | {own['flops']:.3g} | "
                     + at)
    return lines


def _tokens(row: dict) -> float:
    return row.get("generated_tokens", row.get("mean_tokens", 0.0))


def plot(results_by_run: dict[str, dict], path: str, x: str = "generated_tokens") -> None:
    """Accuracy against `x` (generated tokens or FLOPs per input), a point per system and run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    markers = "osD^vP*X"
    for k, (run, results) in enumerate(results_by_run.items()):
        curves = {f"routed by {m}": (r["sweep"], ROUTER_COLORS[m]) for m, r in (results.get("routers") or {}).items()}
        if not curves and results.get("sweep"):
            curves = {"routed": (results["sweep"], COLORS["routed"])}
        for label, (curve, color) in curves.items():
            points = sorted(curve, key=lambda p: p[x])
            ax.plot([p[x] for p in points], [100 * p["accuracy"] for p in points], color=color, alpha=0.5,
                    marker=".", label=f"{label}, over thresholds" + (f" ({run})" if run else ""), zorder=2)
        for name, default in SYSTEMS:
            row, color = results.get(name), COLORS[name]
            if row is None:
                continue
            value = row[x] if x != "generated_tokens" else _tokens(row)
            name_label = system_label(results, name, default)
            tag = f"{name_label} ({run})" if len(results_by_run) > 1 else name_label
            ax.scatter([value], [100 * row["accuracy"]], s=80, color=color, marker=markers[k % len(markers)],
                       label=tag, zorder=3)
            ax.annotate(f"{100 * row['accuracy']:.1f}%", (value, 100 * row["accuracy"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("symlog", linthresh=10) if x == "generated_tokens" else ax.set_xscale("log")
    ax.set_xlabel(("generated tokens" if x == "generated_tokens" else "forward FLOPs") + " per input (log)")
    save_percent_plot(fig, ax, "accuracy (%)", "Accuracy vs cost", path)


def save_percent_plot(fig, ax, ylabel: str, title: str, path: str) -> None:
    """Finish a plot whose y axis is a percentage and write it atomically (a PNG is never seen half-written)."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_ylim(-5, 105)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(results: dict, workdir: str) -> tuple[str, str]:
    """`report.md`, `report.png` (accuracy vs generated tokens) and `report_flops.png` (vs FLOPs) in `workdir`."""
    md, png = os.path.join(workdir, "report.md"), os.path.join(workdir, "report.png")
    plot({"": results}, png)
    if all((results.get(name) or {}).get("flops") for name, _ in SYSTEMS if results.get(name)):
        plot({"": results}, os.path.join(workdir, "report_flops.png"), x="flops")
    write_atomic(md, markdown(results))
    return md, png


# ------------------------------------------------------------------------------------------ several runs


def paper_rows(path: str = PAPER) -> dict[str, dict]:
    """The paper's results (package data `paper_results.json`): task -> {system: (value, text), "metric", ...}."""
    data = json.load(open(path, encoding="utf-8"))
    out = {}
    for task, row in data["tasks"].items():
        out[task] = {name: (_number(row[name]), row[name]) for name in ("system1", "system2", "distilled")}
        out[task].update(metric=row["metric"], model=data["model"], reference=data["reference"])
    return out


def _number(text: str) -> float | None:
    m = re.match(r"\s*(\d+(?:\.\d+)?)", text)
    return float(m.group(1)) if m else None


def compare(workdirs: list[str], paper: str = PAPER) -> tuple[str, dict]:
    """Several runs' eval.json side by side: accuracy and cost per system, one column group per run, and the
    paper's number for the task where the paper reports it."""
    runs = {}
    for w in workdirs:
        path = os.path.join(w, "eval.json")
        if not os.path.exists(path):
            raise S2DError(f"{path}: no such file (run `s2d eval` in {w} first)")
        try:
            runs[os.path.basename(os.path.normpath(w))] = json.load(open(path))
        except json.JSONDecodeError as e:
            raise S2DError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    reference = paper_rows(paper)
    tasks = {r.get("meta", {}).get("task") for r in runs.values()}
    header = ["system"] + [f"{run}: accuracy (%) / generated tokens / FLOPs / s per input" for run in runs]
    paper_task = next(iter(tasks)) if len(tasks) == 1 and next(iter(tasks)) in reference else None
    if paper_task:
        header.append(f"paper ({reference[paper_task]['model']}, {reference[paper_task]['metric']})")
    lines = ["# Runs side by side", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, label in SYSTEMS:
        if not any(results.get(name) for results in runs.values()) and name not in reference.get(paper_task, {}):
            continue  # a system no run has (the routed one, without a router)
        cells = [label]
        for results in runs.values():
            row = results.get(name)
            cells.append("" if row is None else f"{100 * row['accuracy']:.1f} / {_tokens(row):.1f} / "
                         f"{row.get('flops', 0):.3g} / {row.get('seconds', 0):.2f}")
        if paper_task:
            cells.append(reference[paper_task].get(name, (None, ""))[1])
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {run}: {r.get('meta', {}).get('program')} on {r.get('meta', {}).get('task')}, model "
                     f"{r.get('meta', {}).get('model')}, filter {r.get('filter', {}).get('filter', '-')}"
                     f" (kept {r.get('filter', {}).get('kept', '-')} of {r.get('filter', {}).get('total', '-')})"
                     for run, r in runs.items()]
    if paper_task:
        lines += ["", f"Paper column: {reference[paper_task]['reference']}."]
    return "\n".join(lines) + "\n", runs


def write_comparison(workdirs: list[str], out_dir: str) -> tuple[str, str]:
    text, runs = compare(workdirs)
    os.makedirs(out_dir, exist_ok=True)
    md, png = os.path.join(out_dir, "comparison.md"), os.path.join(out_dir, "comparison.png")
    plot(runs, png)
    write_atomic(md, text)
    return md, png
