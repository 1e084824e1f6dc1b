"""`report.md` (the paper-style table, with what the filter kept and how training ended) and `report.png`
(accuracy against mean generated tokens per input, one point per system), both from `eval.json`."""

from __future__ import annotations

import os

from s2d_jax.artifacts import write_atomic

SYSTEMS = (("system1", "System 1 (base, direct)"), ("system2", "System 2 (program)"),
           ("distilled", "Distilled System 1"))
CORE = ("accuracy", "mean_tokens", "n", "seconds")


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        return f"{100 * value:.1f}" if key not in ("mean_tokens", "seconds") else f"{value:.1f}"
    return str(value)


def markdown(results: dict) -> str:
    meta = results.get("meta", {})
    title = " / ".join(str(meta[k]) for k in ("program", "task", "model") if meta.get(k))
    extras = sorted({k for name, _ in SYSTEMS for k in (results.get(name) or {}) if k not in CORE})
    header = ["system", "accuracy (%)", "mean tokens / input", "n", "seconds"] + [f"{k} (%)" for k in extras]
    lines = [f"# System 2 distillation: {title}" if title else "# System 2 distillation", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, label in SYSTEMS:
        row = results.get(name)
        if row is None:
            if name in results:
                lines.append(f"| {label} | (none: nothing was distilled) |" + " |" * (len(header) - 2))
            continue
        cells = [label] + [_fmt(k, row[k]) if k in row else "" for k in CORE] + [
            _fmt(k, row[k]) if k in row else "" for k in extras]
        lines.append("| " + " | ".join(cells) + " |")
    s1, s2, d = (results.get(k) for k in ("system1", "system2", "distilled"))
    if s1 and s2 and d:
        lines += ["", f"Distilled System 1 vs System 2: {100 * (d['accuracy'] - s2['accuracy']):+.1f} points at "
                      f"{d['mean_tokens'] / max(s2['mean_tokens'], 1e-9):.2f}x its tokens per input; "
                      f"vs System 1: {100 * (d['accuracy'] - s1['accuracy']):+.1f} points."]
    f = results.get("filter")
    if f:
        drops = ", ".join(f"{k} {v}" for k, v in f.get("drops", {}).items()) or "none"
        lines += ["", f"Filter `{f.get('filter', 'majority')}`: kept {f['kept']} of {f['total']} unlabelled inputs "
                      f"({100 * f['kept_fraction']:.1f}%); drops: {drops}."]
    t = results.get("train")
    if t:
        lines += [f"Training: {t.get('step')} steps, final loss {t.get('loss', float('nan')):.4f}, token accuracy "
                  f"{100 * t.get('accuracy', 0):.1f}%."]
    if meta.get("note"):
        lines += ["", meta["note"]]
    lines += ["", "Accuracy is on the held-out labelled split; mean tokens count every generated token of every "
                  "stage. Plot: `report.png`."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for (name, label), color in zip(SYSTEMS, ("tab:blue", "tab:orange", "tab:green")):
        row = results.get(name)
        if row is None:
            continue
        ax.scatter([row["mean_tokens"]], [100 * row["accuracy"]], s=80, color=color, label=label, zorder=3)
        ax.annotate(f"{100 * row['accuracy']:.1f}%", (row["mean_tokens"], 100 * row["accuracy"]),
                    textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("mean generated tokens per input (log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Accuracy vs cost", fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(results: dict, workdir: str) -> tuple[str, str]:
    md, png = os.path.join(workdir, "report.md"), os.path.join(workdir, "report.png")
    plot(results, png)
    write_atomic(md, markdown(results))
    return md, png
