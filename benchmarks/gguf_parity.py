"""Our GGUF loader against transformers' on a real checkpoint: the same tokens and the same logits (fp32).

The suite checks SmolLM2 (Q4_1) this way (tests/test_smollm2.py); this does it for any model the package index
carries, e.g. Gemma 3 270M in Q4_K_M (K-quants, dequantised by the `gguf` package), without adding a 250 MB
download to the suite.

    .venv/bin/python benchmarks/gguf_parity.py --model gemma3
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import s2d_jax  # noqa: E402
from s2d_jax import assets  # noqa: E402

PROMPTS = ("The capital of France is",
           'Take the last letters of the words in "Elon Musk" and concatenate them.',
           "A coin is heads up. Ken flips the coin. Is the coin still heads up?")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma3", help="a .gguf path, or an asset name (smollm2, gemma3)")
    a = p.parse_args()
    import jax.numpy as jnp
    import torch
    import transformers

    path = assets.fetch(a.model) if a.model in assets.ASSETS else a.model
    start = time.perf_counter()
    model, tok = s2d_jax.load_model(path), s2d_jax.load_tokenizer(path)
    ours_s = time.perf_counter() - start
    d, f = os.path.split(path)
    start = time.perf_counter()
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    print(f"{os.path.basename(path)}: {model.cfg.model_type}, {model.cfg.num_layers} layers, "
          f"{model.cfg.num_params:,} parameters; loaded in {ours_s:.0f} s (ours), "
          f"{time.perf_counter() - start:.0f} s (transformers)")
    print("| prompt | tokens | same tokens | max abs logit diff | max abs logit | same argmax |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for text in PROMPTS:
        ids = tok(text).input_ids
        same = ids == ref_tok(text).input_ids
        ours = np.asarray(model(jnp.asarray([ids], jnp.int32)))
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits.float().numpy()
        diff = float(np.abs(ours - theirs).max())
        worst = max(worst, diff)
        print(f"| {text[:32]} | {len(ids)} | {same} | {diff:.2e} | {np.abs(theirs).max():.1f} | "
              f"{(ours.argmax(-1) == theirs.argmax(-1)).mean():.0%} |")
    print(f"worst logit difference: {worst:.2e}")


if __name__ == "__main__":
    main()
