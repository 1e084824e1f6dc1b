"""A System 2 workload end to end: SmolLM2-135M-Instruct runs CoT and RaR (2-step) on generated coin flips, N samples
each (temperature 0.7, at most `--new` tokens per stage), three ways in one process:

- the engine (continuous batching, pipelined stages: `run_program` as the generate stage runs it);
- the engine with continuous batching off (static batches of the same slots);
- transformers' `generate` (torch, KV cache) with the same sampling settings, stage by stage, in static batches of
  the same size (`num_return_sequences` for the N samples of stage 1).

Prints wall time, samples/s, generated tokens/s, the ratio to transformers, useful / decoded rows (rows that
sampled a token over rows the decode steps ran) and decode MFU (matmul FLOPs of the generated tokens over a
matmul peak measured in this run). With the engine's records it also gives what vote-aware sampling would draw
(`generate.adaptive`, waves of 2: the samples are keyed, so an adaptive run draws exactly these samples' prefix):
samples and tokens per input, and the share of inputs whose kept answer differs from the full-N vote.
A warm-up pass on a few inputs runs first on every side, and the engine's own warm-up (`Sampler(warmup=True)`)
compiles every shape stage 1's prompts can meet; XLA compiles inside the timed run are counted and printed (a
later stage's prompts are not known ahead: theirs compile when met), with the share of the engine's call spent in
decode steps.

    .venv/bin/python benchmarks/rollouts.py                       # 64 flips x 8 samples, 256 tokens (the issue's)
    .venv/bin/python benchmarks/rollouts.py --inputs 16 --samples 4 --new 128 --programs cot   # a short CPU run
    python3 benchmarks/rollouts.py --preset llama3.2-1b --dtype bfloat16          # a GPU without network
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import s2d_jax  # noqa: E402
from s2d_jax.model.flops import flops_per_token, matmul_peak  # noqa: E402
from s2d_jax.system2.adaptive import samples_needed  # noqa: E402
from s2d_jax.system2.filters import vote  # noqa: E402
from s2d_jax.system2.programs import get_program, run_program  # noqa: E402
from s2d_jax.system2.tasks import get_task  # noqa: E402
from s2d_jax.tokenizer import chat_prompt  # noqa: E402
from sampler import load_models  # noqa: E402  (benchmarks/sampler.py)

TEMPERATURE = 0.7


def ours(model, tok, program, examples, args, continuous: bool):
    """The engine's records, wall seconds, useful rows, XLA compiles in the timed run and its decode share."""
    sampler = s2d_jax.Sampler(model, tok, max_batch=args.slots, continuous=continuous, warmup=True)
    budgets = {s.name: args.new for s in program.stages}
    run = lambda ex: run_program(program, ex, sampler, args.samples, parse=get_task("coin_flip").parse, seed=0,
                                 budgets=budgets, progress=False, temperature=TEMPERATURE)
    run(examples[:max(1, args.slots // args.samples)])  # compile
    t = time.perf_counter()
    records = run(examples)  # the warm-up (every shape of stage 1's prompts) is in it, outside the engine's clock
    wall = time.perf_counter() - t
    stats = sampler.last_stats
    return (records, wall, stats["live_rows"] / max(stats["rows"], 1), stats["compiles"],
            stats["seconds"]["decode"] / stats["wall_s"])


def transformers_run(torch_model, tok, program, examples, args):
    """Stage by stage, static batches of `args.slots` rows; returns (generated tokens, samples, wall, useful share)."""
    import torch

    eos = tok.eos_token_id
    per_call = max(1, args.slots // args.samples)
    states = [{"input": e.input} for e in examples for _ in range(args.samples)]
    tokens = useful = decoded = 0
    t = time.perf_counter()
    for index, stage in enumerate(program.stages):
        if index == 0:
            prompts, k = [stage.template.format(**states[i * args.samples]) for i in range(len(examples))], args.samples
        else:
            prompts, k = [stage.template.format(**s) for s in states], 1
        step = per_call if k > 1 else args.slots
        outs = []
        for b in range(0, len(prompts), step):
            ids = [tok(chat_prompt(tok, p), add_special_tokens=False).input_ids for p in prompts[b:b + step]]
            width = max(map(len, ids))
            device = torch_model.device
            batch = torch.tensor([[tok.pad_token_id or 0] * (width - len(i)) + i for i in ids], device=device)
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
            with torch.no_grad():
                out = torch_model.generate(batch, attention_mask=mask, do_sample=True, temperature=TEMPERATURE,
                                           top_k=0, top_p=1.0, max_new_tokens=args.new, num_return_sequences=k,
                                           pad_token_id=tok.pad_token_id or 0, eos_token_id=eos)[:, width:].tolist()
            for row in out:
                n = next((j + 1 for j, x in enumerate(row) if x == eos), len(row))
                outs.append(tok.decode(row[:n], skip_special_tokens=True))
                tokens += n
            decoded += len(out) * max(len(r) for r in out)
        for s, o in zip(states, outs):
            s[stage.name] = o
    useful = tokens / max(decoded, 1)
    return tokens, len(states), time.perf_counter() - t, useful


def adaptive(records, samples: int, rule: str):
    """Samples and tokens per input that vote-aware sampling draws (waves of 2), and the share of changed votes."""
    by_input: dict[str, list] = {}
    for r in records:
        by_input.setdefault(r["id"], []).append(r)
    used = tokens = changed = 0
    for rs in by_input.values():
        rs.sort(key=lambda r: r["sample"])
        answers = [r["answer"] for r in rs]
        k = samples_needed(answers, samples, 2, rule, min_share=0.5)
        used += k
        tokens += sum(r["num_tokens"] for r in rs[:k])
        changed += vote(answers[:k], 0.5, total=samples if rule == "decided" else None).answer != \
            vote(answers, 0.5).answer
    n = len(by_input)
    return used / n, tokens / n, changed / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--programs", default="cot,rar2")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--preset", default="", help="random weights at this preset's shape and a word-level tokenizer "
                    "(no download: for a GPU machine without network; rows rarely end early)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    model, tok, torch_model = load_models(args.preset, args.dtype, not args.skip_torch)
    examples = get_task("coin_flip").generate(args.inputs, seed=0)
    peak = matmul_peak(args.dtype)
    print(f"{args.preset or 'SmolLM2-135M-Instruct'} {args.dtype} on {jax.devices()[0].device_kind} "
          f"({os.cpu_count()} threads), matmul peak {peak / 1e12:.2f} TFLOP/s; {args.inputs} coin flips x "
          f"{args.samples} samples, T={TEMPERATURE}, <= {args.new} tokens per stage, {args.slots} slots / batch rows")
    print(f"{'program':>7} {'system':>18} {'wall s':>8} {'samples/s':>9} {'tokens/s':>9} {'vs hf':>6} "
          f"{'useful rows':>11} {'decode MFU':>10} {'compiles':>8} {'decode share':>12}")
    for name in args.programs.split(","):
        program = get_program(name)
        rows, hf_rate = [], None
        if torch_model is not None:
            transformers_run(torch_model, tok, program, examples[:max(1, args.slots // args.samples)], args)  # warm up
            tokens, count, wall, useful = transformers_run(torch_model, tok, program, examples, args)
            hf_rate = tokens / wall
            rows.append(("transformers", wall, count, tokens, useful, 0, 0, None))
        for label, continuous in (("engine, static", False), ("engine", True)):
            records, wall, useful, compiles, share = ours(model, tok, program, examples, args, continuous)
            tokens = sum(r["num_tokens"] for r in records)
            context = np.mean([r["prompt_tokens"] / len(program.stages) for r in records]) + args.new / 2
            rows.append((label, wall, len(records), tokens, useful, flops_per_token(model.cfg, context), compiles,
                         share))
        for label, wall, count, tokens, useful, flops, compiles, share in rows:
            ratio = f"{tokens / wall / hf_rate:6.2f}" if hf_rate else f"{'-':>6}"
            mfu = f"{flops * tokens / wall / peak:10.1%}" if flops else f"{'-':>10}"
            print(f"{name:>7} {label:>18} {wall:8.1f} {count / wall:9.2f} {tokens / wall:9.1f} {ratio} "
                  f"{useful:11.1%} {mfu} {compiles:8d} {f'{share:.1%}' if share is not None else '-':>12}")
        for rule in ("decided", "beta"):
            used, tokens, changed = adaptive(records, args.samples, rule)
            full = sum(r["num_tokens"] for r in records) / args.inputs
            print(f"{name:>7} adaptive {rule:>8}: {used:.2f} of {args.samples} samples, {tokens:.0f} of {full:.0f} "
                  f"tokens per input ({1 - tokens / full:.1%} saved); kept answer differs from the full vote: "
                  f"{changed:.1%}")


if __name__ == "__main__":
    main()
