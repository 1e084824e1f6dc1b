"""What int8 costs in accuracy: System 1 and System 2 of a model scored as `s2d eval` scores them with the weights and
the KV cache in the compute dtype, then with int8 weights (`generate.weights_dtype=int8`), an int8 cache
(`generate.cache_dtype=int8`) and both, on the same held-out inputs; and how often the greedy answer (System 1:
its whole text) is the unquantised one's.

    .venv/bin/python benchmarks/int8_accuracy.py --n 100                           # SmolLM2-135M-Instruct, coin flip
    .venv/bin/python benchmarks/int8_accuracy.py --config configs/demo.py --workdir runs/demo   # the demo's models

With `--workdir`, the run's pretrained base (a toy run's `base/`) is System 1 and System 2, and its distilled model
(`model/`) is scored too.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from s2d_jax import evaluate  # noqa: E402
from s2d_jax.build import build_mesh, build_model, build_tokenizer  # noqa: E402
from s2d_jax.config import load_config  # noqa: E402
from s2d_jax.model import quant  # noqa: E402
from s2d_jax.sampling import Sampler  # noqa: E402
from s2d_jax.stages.inputs import load_eval_inputs, program_args, system1_prompt  # noqa: E402
from s2d_jax.system2.programs import get_program  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "smollm2_coin_flip.py")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--workdir", default="", help="a run's workdir: its base model and distilled model/")
    p.add_argument("--n", type=int, default=100, help="held-out inputs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    config = load_config(a.config, [f"eval.n={a.n}", "eval.variants=()", *a.set])
    mesh = build_mesh(config)
    workdir = a.workdir or None
    tok = build_tokenizer(config, workdir)
    task, examples = load_eval_inputs(config)
    examples = examples[:a.n]
    args = program_args(config, task)
    common = dict(chat=config.program.chat, mesh=mesh, max_batch=config.generate.max_batch)
    budget = config.eval.max_new_tokens or task.answer_tokens
    prompts = [system1_prompt(config, task, x) for x in examples]
    models = {"base": build_model(config, mesh, workdir)}
    if workdir and os.path.isdir(os.path.join(workdir, "model")):
        models["distilled"] = build_model(config, mesh, path=os.path.join(workdir, "model"))
    print(f"{config.model.path or config.model.preset} ({models['base'].cfg.dtype} compute), task {task.name}, "
          f"program {config.program.name}, {len(examples)} inputs")
    print("| model | system | weights | KV cache | accuracy (%) | same answer as unquantised | same text | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        systems = {"System 1": lambda m, kv: evaluate.system1(m, tok, task, examples, prompt=lambda x: system1_prompt(
            config, task, x), max_new_tokens=budget, cache_dtype=kv, **common)}
        if name == "base":
            systems["System 2"] = lambda m, kv: evaluate.system2(get_program(config.program.name), m, tok, task,
                                                                 examples, samples=1, budgets=args["budgets"],
                                                                 params=args["params"], cache_dtype=kv, **common)
        for system, score in systems.items():
            ref = texts = None
            for dtype, kv in (("", None), ("int8", None), ("", "int8"), ("int8", "int8")):
                m = quant.quantize(model, dtype)
                start = time.perf_counter()
                out = score(m, kv)
                seconds = time.perf_counter() - start
                answers = [r["answer"] for r in out["per_input"]]
                said = None
                if system == "System 1":  # the whole greedy text, token for token
                    sampler = Sampler(m, tok, mesh=mesh, max_batch=common["max_batch"], cache_dtype=kv)
                    said = [s[0].token_ids for s in sampler.generate(prompts, max_new_tokens=budget,
                                                                     chat=common["chat"], progress=False)]
                if dtype == "" and kv is None:
                    ref, texts = answers, said
                    same = same_text = "-"
                else:
                    same = f"{100 * sum(x == y for x, y in zip(answers, ref)) / len(ref):.1f}%"
                    same_text = "-" if said is None else \
                        f"{100 * sum(x == y for x, y in zip(said, texts)) / len(said):.1f}%"
                print(f"| {name} | {system} | {dtype or m.cfg.dtype} | {kv or m.cfg.dtype} | "
                      f"{100 * out['accuracy']:.1f} | {same} | "
                      f"{same_text} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
