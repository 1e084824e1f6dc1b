"""BSM's solve stage with and without shared-prefix prefill: SmolLM2-135M-Instruct scores MT-bench answer pairs
(the human-judged pairs of MT-bench, `data:mt_bench`) on five criteria, one call per criterion, all calls of a pair
sharing everything before the criterion. With `Job.shared_prefix` that head is prefilled once per refill;
without, once per call. Prints wall time, prompt tokens prefilled, generated tokens/s, the speed-up, and the share
of outputs identical between the two (greedy: they differ only where float rounding of the two prefills flips a
near tie). Each side runs the workload once untimed first, so the timings hold no compiles. The five criteria stand in for the branch stage's plan (BSM's typical ones), so every pair has five.

    .venv/bin/python benchmarks/shared_prefix.py [--pairs 8] [--new 64] [--slots 16]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import s2d_jax  # noqa: E402
from s2d_jax import datasets  # noqa: E402
from s2d_jax.sampling import Job  # noqa: E402
from s2d_jax.system2.programs import BSM_SOLVE, PARAMS  # noqa: E402
from s2d_jax.system2.tasks import get_task  # noqa: E402
from sampler import load_models  # noqa: E402  (benchmarks/sampler.py)

CRITERIA = ["Relevance: does the response address the user's question?",
            "Accuracy: is the information in the response correct?",
            "Helpfulness: does the response help the user?",
            "Depth: does the response go into detail where the question needs it?",
            "Clarity: is the response clear and well organised?"]
DATA = "data:mt_bench"  # fetched by name (S2D_DATA_MIRROR for a local copy)


def run(sampler, pairs, shared: bool, new: int):
    out = {}
    jobs = []
    for p, meta in enumerate(pairs):
        head = BSM_SOLVE.split("{item}")[0].format(**PARAMS, **meta)
        jobs += [Job(BSM_SOLVE.format(**PARAMS, **meta, item=c), key=p * 10 + k, max_new_tokens=new, tag=(p, k),
                     shared_prefix=len(head) if shared else 0) for k, c in enumerate(CRITERIA)]
    before = sampler.prefill_tokens
    t = time.perf_counter()
    sampler.stream(jobs, lambda job, samples: out.__setitem__(job.tag, samples[0]), chat=True, progress=False)
    return out, time.perf_counter() - t, sampler.prefill_tokens - before


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--data", default=DATA)
    args = ap.parse_args()
    model, tok, _ = load_models("", "float32", with_torch=False)
    examples = get_task("mt_bench_judge").load(datasets.resolve(args.data))
    pairs = [{k: e.meta[k] for k in ("question", "response_a", "response_b")} for e in examples[:args.pairs]]
    print(f"SmolLM2-135M-Instruct fp32, {args.pairs} MT-bench pairs x {len(CRITERIA)} criteria, greedy, <= {args.new} "
          f"new tokens, {args.slots} slots; prompts {min(len(tok(BSM_SOLVE.format(**PARAMS, **m, item='x')).input_ids) for m in pairs)}-"
          f"{max(len(tok(BSM_SOLVE.format(**PARAMS, **m, item='x')).input_ids) for m in pairs)} tokens")
    sampler = s2d_jax.Sampler(model, tok, max_batch=args.slots)
    results = {}
    for shared in (False, True):
        run(sampler, pairs, shared, args.new)  # the same calls once untimed: every shape they need is compiled
        results[shared] = run(sampler, pairs, shared, args.new)
    print(f"{'prefill':>14} {'wall s':>8} {'prompt tokens prefilled':>24} {'generated tok/s':>15}")
    for shared, (out, wall, prefilled) in results.items():
        generated = sum(s.num_tokens for s in out.values())
        print(f"{'shared prefix' if shared else 'per call':>14} {wall:8.1f} {prefilled:>24d} {generated / wall:15.1f}")
    (a, wall_a, _), (b, wall_b, _) = results[False], results[True]
    same = sum(a[k].token_ids == b[k].token_ids for k in a) / len(a)
    print(f"speed-up {wall_a / wall_b:.2f}x; identical outputs {same:.0%}")


if __name__ == "__main__":
    main()
