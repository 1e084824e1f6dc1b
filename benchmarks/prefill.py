"""Prefill padding: token positions the engine prefills against the prompt tokens it needs, on long prompts, with
the engine's bucketing now (lengths four per octave, rows in power-of-two chunks, chunks halved where ragged) and
before (one prefill per fill, lengths and rows padded up to powers of two), in one run on the same prompts and the
same engine (the old rules swapped in).

Workloads (SmolLM2-135M-Instruct's tokenizer and chat template, one new token per call so prefill is the work):
- RaR's second stage on generated coin flips: "(original) question (rephrased) ...": the rephrasing is stood in
  for by the question written twice (a rephrasing runs about 1-2x its question);
- BSM's solve stage on MT-bench answer pairs x 5 criteria (as benchmarks/shared_prefix.py), one call each.
Prints prompt tokens, positions prefilled, the padding overhead and the prefill seconds (compiles excluded).

    .venv/bin/python benchmarks/prefill.py [--inputs 64] [--pairs 8] [--slots 32]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import s2d_jax  # noqa: E402
from s2d_jax import datasets  # noqa: E402
from s2d_jax.sampling import Job, fill  # noqa: E402
from s2d_jax.sampling import cache as cache_lib  # noqa: E402
from s2d_jax.system2.programs import BSM_SOLVE, PARAMS, get_program  # noqa: E402
from s2d_jax.system2.tasks import get_task  # noqa: E402
from sampler import load_models  # noqa: E402  (benchmarks/sampler.py)
from shared_prefix import CRITERIA, DATA  # noqa: E402


def rar_prompts(n: int) -> list[str]:
    answer = get_program("rar2").stages[1].template
    return [answer.format(input=e.input, rephrase=f"{e.input}\n{e.input}")
            for e in get_task("coin_flip").generate(n, seed=0)]


def bsm_prompts(pairs: int, data: str) -> list[str]:
    examples = get_task("mt_bench_judge").load(datasets.resolve(data))[:pairs]
    return [BSM_SOLVE.format(**PARAMS, **{k: e.meta[k] for k in ("question", "response_a", "response_b")}, item=c)
            for e in examples for c in CRITERIA]


class Before:
    """The engine's bucketing before: prompt lengths and prefill rows padded up to powers of two."""

    def __enter__(self):
        self.saved = fill.length_bucket, fill.chunks
        fill.length_bucket = cache_lib.bucket

        def one_chunk(sampler, group, multiple):  # every prompt of a fill in one prefill, rows padded up
            return [(group, -(-cache_lib.bucket(len(group), 1) // multiple) * multiple)] if group else []

        fill.chunks = one_chunk

    def __exit__(self, *exc):
        fill.length_bucket, fill.chunks = self.saved


def measure(sampler, prompts: list[str]) -> tuple[int, int, float]:
    """(prompt tokens, positions prefilled, prefill seconds) of one call over `prompts`."""
    tokens, padded = sampler.prefill_tokens, sampler.prefill_padded
    sampler.stream([Job(p, key=k, max_new_tokens=1) for k, p in enumerate(prompts)], lambda job, s: None, chat=True,
                   progress=False)
    return (sampler.prefill_tokens - tokens, sampler.prefill_padded - padded,
            sampler.last_stats["seconds"]["prefill"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--programs", default="rar,bsm")
    args = ap.parse_args()
    model, tok, _ = load_models("", "float32", with_torch=False)
    sampler = s2d_jax.Sampler(model, tok, max_batch=args.slots)
    workloads = {"RaR answer": rar_prompts(args.inputs), "BSM solve": bsm_prompts(args.pairs, args.data)}
    workloads = {k: v for k, v in workloads.items() if k.split()[0].lower() in args.programs.split(",")}
    print(f"SmolLM2-135M-Instruct fp32, {args.slots} slots, chat template, 1 new token per call")
    print(f"{'workload':>10} {'calls':>5} {'bucketing':>9} {'prompt tokens':>13} {'prefilled':>9} {'overhead':>8} "
          f"{'prefill s':>9}")
    for name, prompts in workloads.items():
        for label, rules in (("before", Before), ("now", None)):
            with rules() if rules else open(os.devnull):
                need, done, seconds = measure(sampler, prompts)
            print(f"{name:>10} {len(prompts):>5} {label:>9} {need:>13} {done:>9} {done / need - 1:>8.1%} "
                  f"{seconds:>9.1f}")


if __name__ == "__main__":
    main()
