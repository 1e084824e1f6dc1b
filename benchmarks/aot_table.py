"""The README's table of paper configs compiled for their targets: `s2d plan --config.plan.topology=T` for each
config x target at the real model shape (llama3-8b), from this machine, then one markdown row each.

    python benchmarks/aot_table.py --out /tmp/aot_table            # runs every plan (minutes each), then the table
    python benchmarks/aot_table.py --out /tmp/aot_table --reuse     # the table from plans already in --out
    python benchmarks/aot_table.py --out /tmp/aot_table --targets v5e-8,v5p-64   # some targets (or --configs)

Needs libtpu (and the CUDA plugin for h100-80gb): `pip install -e '.[test]'`. Each row's command is
`s2d plan --config configs/CONFIG.py --config.model.path= --config.model.preset=llama3-8b --config.plan.topology=T`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

CONFIGS = ["rar2_last_letters", "rar2_last_letters_system1_sc", "cot_gsm8k", "bsm_mt_bench", "rar2_last_letters_full"]
# configs whose programs are the same at the same shapes
SAME = {"rar2_last_letters": "= rar2_coin_flip, s2a_sycophancy, _no_filter, _threshold",
        "rar2_last_letters_system1_sc": "= rar2_coin_flip_system1_sc"}
TARGETS = ["v5e-8", "v5p-64", "v6e-8", "h100-80gb"]
GB = 1 << 30


def run(out: str, config: str, target: str) -> None:
    workdir = os.path.join(out, f"{config}_{target}")
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, "-m", "s2d_jax.cli", "plan", "--config", f"configs/{config}.py", "--workdir", workdir,
           "--config.model.path=", "--config.model.preset=llama3-8b", f"--config.plan.topology={target}"]
    with open(os.path.join(workdir, "out.txt"), "w") as o, open(os.path.join(workdir, "err.txt"), "w") as e:
        subprocess.run(cmd, stdout=o, stderr=e, check=False)


def row(out: str, config: str, target: str) -> str:
    workdir = os.path.join(out, f"{config}_{target}")
    name = f"`{config}`" + (f" ({SAME[config]})" if config in SAME else "")
    path = os.path.join(workdir, "plan.json")
    if not os.path.exists(path):
        err = os.path.join(workdir, "err.txt")
        lines = open(err).read().strip().splitlines() if os.path.exists(err) else []
        return f"| {name} | {target} | {(lines or ['not run'])[-1].removeprefix('s2d: error: ')[:170]}... |||||||"
    p = json.load(open(path))
    p.update(_estimate(config, p["devices"], p.get("generate_mesh")))  # today's (shapes only), beside XLA's
    c, e = p["compiled"], p["roofline_estimate"]
    compile_s = sum(x.get("compile_s", 0) for x in c.values())  # (a prefill bucket: costs only)
    over = lambda kind: " **over HBM**" if p[f"{kind}_compiled"] > p["device_gb"] * GB else ""
    cells = [f"{p['train_compiled'] / GB:.2f} ({p['train_total'] / GB:.2f}){over('train')}",
             f"{p['generate_compiled'] / GB:.2f} ({p['generate_total'] / GB:.2f}){over('generate')}"]
    if e:
        d = c["decode"]
        cells += [f"{e['train_step_s']:.3f}", f"{e['train_tokens_per_s']:,.0f}",
                  f"{e['decode_tokens_per_s']:,.0f} ({e['decode_slots']})",
                  f"{d['hbm_tokens_per_s']:,.0f} ({d['floor_over_hbm_roofline']:.2f})" if "hbm_tokens_per_s" in d
                  else "not in this plan"]
    else:
        cells += ["n/a", "n/a", "n/a", "n/a"]
    return f"| {name} | {target} | " + " | ".join(cells) + f" | {compile_s:.0f} |"


def _estimate(config: str, devices: int, generate_mesh: dict | None) -> dict:
    """The plan's estimate by today's code, generation on the mesh the plan compiled it on (a plan from before
    the generation mesh: the training mesh)."""
    from s2d_jax.plan import estimate as plan
    from s2d_jax.config import load_config

    cfg = load_config(f"configs/{config}.py", ["model.path=", "model.preset=llama3-8b"])
    gen = types.SimpleNamespace(shape=generate_mesh, size=devices) if generate_mesh else None
    p = plan.plan(cfg, plan.mesh_shape(cfg.mesh, devices), gen)
    return {"train_total": p["train_total"], "generate_total": p["generate_total"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--reuse", action="store_true", help="only read the plans already in --out")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    targets, configs = args.targets.split(","), args.configs.split(",")
    if not args.reuse:
        for target in targets:
            for config in configs:
                run(args.out, config, target)
    print("| config | target | train GB/chip, compiled (estimate) | generate GB/chip, compiled (estimate) | "
          "train step s (roofline) | train tokens/s (roofline) | decode tokens/s (roofline; slots) | "
          "decode tokens/s by HBM bytes (floor / that roofline) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for config in configs:
        for target in targets:
            print(row(args.out, config, target))


if __name__ == "__main__":
    main()
