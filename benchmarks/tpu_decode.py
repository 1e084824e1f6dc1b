"""Decode on a TPU by XLA's own figures, before renting one: tokens/s of the sampler's decode step at 32/64/128/256
slots, bf16, int8 weights and int8 weights + KV cache, for Llama-3-8B and a 1B shape on a v5e-8 and a v5p-8, beside the published JetStream
figures. Each row compiles the run's decode program for the target (libtpu, from this CPU) on the generation mesh
`s2d plan` would choose, exactly as `s2d plan --config.plan.topology=T` does, and prints:

- roofline ms: XLA's cost analysis of one decode step (FLOPs and bytes of the whole program: it runs its layers
  unrolled; before 2026-12-07, extrapolated from 1- and 2-layer copies) against the
  chip's peaks, `max(FLOPs / peak, bytes / HBM bandwidth)`: an estimate, never a measurement;
- floor ms: the bytes a step must read per chip (the weights and the live KV of every slot) over HBM bandwidth;
- floor/roofline: 1 = XLA's program reads only what it must; tokens/s = slots / roofline over the whole slice;
- HBM roofline ms: the same with only the bytes that have an end in HBM (`s2d_jax/plan/hbm.py`: XLA's count also
  sums every read and write of VMEM, so a weight prefetched there counts about three times), its floor/roofline
  and tokens/s; int8 / bf16 compares these.

    python benchmarks/tpu_decode.py                                   # the whole table (about a minute a row)
    python benchmarks/tpu_decode.py --targets v5e-8 --models llama3-8b --slots 128 --dtypes bfloat16,int8 --memory

`--memory` also compiles the full-depth program for XLA's peak bytes per chip (slower). The config is
`configs/rar2_last_letters.py` (prompts up to 256 tokens, 256-token stages) at the model's shape.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# JetStream (PyTorch/XLA) serving Llama-3-8B on a v5e-8, as quoted in issue 32 of this project (JetStream's
# published benchmark; not reproduced here): tokens/s and the batch they were measured at.
JETSTREAM = {("llama3-8b", "v5e-8", "bfloat16"): (8249, 128), ("llama3-8b", "v5e-8", "int8"): (10873, 256)}
GB = 1 << 30


def figures(model: str, target: str, slots: int, dtype: str, memory: bool) -> dict:
    from s2d_jax.plan import aot, estimate as plan_lib
    from s2d_jax.config import load_config

    config = load_config("configs/rar2_last_letters.py", [
        "model.path=", f"model.preset={model}", f"generate.max_batch={slots}",
        f"generate.weights_dtype={'' if dtype == 'bfloat16' else 'int8'}",
        f"generate.cache_dtype={'int8' if dtype == 'int8kv' else ''}"])
    t = aot.target(target)
    p = aot.target_plan(config, t)
    sampler = plan_lib.model_config(config, system2=True).replace(platform=t.platform)
    g = p["generate_mesh"]
    s = plan_lib.sampler_shapes(config, sampler, g["data"] * g["fsdp"])
    fig = aot.programs(config, t, p).figures("decode", sampler, memory=memory)
    aot.decode_figures(fig, p, t, s)
    return {**fig, "generate_mesh": p["generate_mesh"], "weights_gb": p["generate_params"] / GB,
            "kv_live_gb": p["kv_live"] / GB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="v5e-8,v5p-8")
    ap.add_argument("--models", default="llama3-8b,llama3.2-1b")
    ap.add_argument("--slots", default="32,64,128,256")
    ap.add_argument("--dtypes", default="bfloat16,int8,int8kv", help="int8: weights; int8kv: weights and KV cache")
    ap.add_argument("--memory", action="store_true", help="also XLA's peak bytes per chip (full-depth compile)")
    args = ap.parse_args()
    print("| model | target | weights | slots | generation mesh d/f/t | floor ms | XLA roofline ms | floor/XLA "
          "| tokens/s (XLA) | HBM roofline ms | floor/HBM | tokens/s (HBM) | int8 / bf16 (HBM) |"
          + (" peak GB/chip |" if args.memory else "") + " JetStream tokens/s (batch) |")  # int8kv: + KV cache
    print("|---" * (14 + args.memory) + "|")
    base = {}
    for model in args.models.split(","):
        for target in args.targets.split(","):
            for slots in map(int, args.slots.split(",")):
                for dtype in args.dtypes.split(","):
                    start = time.perf_counter()
                    f = figures(model, target, slots, dtype, args.memory)
                    if dtype == "bfloat16":
                        base[(model, target, slots)] = f["hbm_tokens_per_s"]
                    ratio = f["hbm_tokens_per_s"] / base[(model, target, slots)] if (model, target, slots) in base \
                        else None
                    jet = JETSTREAM.get((model, target, dtype.replace("kv", "")))
                    m = f["generate_mesh"]
                    print(f"| {model} | {target} | {dtype} | {f['slots']} | {m['data']}/{m['fsdp']}/{m['tensor']} | "
                          f"{f['hbm_floor_s'] * 1e3:.2f} | {f['roofline_s'] * 1e3:.2f} | "
                          f"{f['floor_over_roofline']:.2f} | {f['tokens_per_s']:,.0f} | "
                          f"{f['hbm_roofline_s'] * 1e3:.2f} | {f['floor_over_hbm_roofline']:.2f} | "
                          f"{f['hbm_tokens_per_s']:,.0f} | {'' if ratio is None else f'{ratio:.2f}x'} |"
                          + (f" {f['peak'] / GB:.2f} |" if args.memory else "")
                          + (f" {jet[0]:,} ({jet[1]}) |" if jet else " |"), flush=True)
                    print(f"  ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
