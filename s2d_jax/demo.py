"""The CPU demo until the distillation pipeline lands: SmolLM2-135M-Instruct, loaded offline from its GGUF,
answers real questions from ../shared/data (coin flip, last letters, GSM8K) through the sampler with its chat
template, directly (System 1) and with "think step by step" (a System 2 prompt), and reports tokens/s.

    python -m s2d_jax.demo [--data ../shared/data] [--n 4]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from s2d_jax import Sampler, load_model, load_tokenizer
from s2d_jax.assets import fetch_smollm2


def _questions(data: str, k: int) -> list[tuple[str, str, str]]:
    out = []
    for task, rel in (("coin flip", "coin_flip/coin_flip.json"), ("last letters", "last_letters/last_letters.json")):
        path = os.path.join(data, rel)
        if os.path.exists(path):
            out += [(task, e["question"], e["answer"]) for e in json.load(open(path))["examples"][:k]]
    path = os.path.join(data, "gsm8k/test.jsonl")
    if os.path.exists(path):
        rows = [json.loads(line) for line, _ in zip(open(path), range(k))]
        out += [("gsm8k", r["question"], r["answer"].split("####")[-1].strip()) for r in rows]
    return out or [("demo", "What is the capital of France?", "Paris")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    ap.add_argument("--n", type=int, default=3, help="questions per task")
    args = ap.parse_args(argv)
    path = fetch_smollm2()
    model, tok = load_model(path), load_tokenizer(path)
    sampler = Sampler(model, tok)
    qs = _questions(os.path.abspath(args.data), args.n)
    for name, suffix, max_new in (("System 1 (direct)", " Answer with only the answer.", 32),
                                  ("System 2 prompt (step by step)", " Let's think step by step.", 128)):
        start = time.perf_counter()
        out = sampler.generate([q + suffix for _, q, _ in qs], max_new_tokens=max_new, chat=True)
        seconds = time.perf_counter() - start
        tokens = sum(s.num_tokens for (s,) in out)
        print(f"\n=== {name}: {len(qs)} questions, {tokens / len(qs):.1f} tokens per answer, "
              f"{tokens / seconds:.0f} tokens/s (compile included)")
        for (task, q, gold), (s,) in zip(qs, out):
            answer = " ".join(s.text.split())
            print(f"[{task}] gold={gold!r}\n  {answer[:160]}{'…' if len(answer) > 160 else ''}")


if __name__ == "__main__":
    main()
