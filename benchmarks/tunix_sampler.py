"""Tunix's sampler on the same weights and prompts as `benchmarks/sampler.py`: run by it, in Tunix's own environment.

Tunix (google-tunix) pins other versions of transformers and huggingface_hub than ours, so it lives in a venv of its
own (`make tunix-venv` or `python -m venv .venv-tunix && .venv-tunix/bin/pip install google-tunix==0.1.7
jax==<ours>`) and `benchmarks/sampler.py --tunix-python .venv-tunix/bin/python` starts this script there. It
loads a Llama-family checkpoint (safetensors, written by our `save_hf`) into Tunix's Llama 3 model (with the rope
base Tunix 0.1.7 drops bound back: see below), runs Tunix's
greedy `Sampler` over the chat-templated prompts in static batches, after one warm-up batch per shape, and writes
each row's tokens up to its EOS and the seconds as JSON.

    python benchmarks/tunix_sampler.py --weights DIR --prompts prompts.json --batch 32 --new 128 --out out.json
"""

import argparse
import functools
import json
import os
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True, help="a Hugging Face Llama checkpoint directory (safetensors)")
    ap.add_argument("--prompts", required=True, help="a JSON list of prompt strings (the chat template applied)")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--new", type=int, required=True)
    ap.add_argument("--eos", type=int, nargs="+", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import jax.numpy as jnp
    import transformers
    from tunix.generate import sampler as sampler_lib
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params

    with open(os.path.join(args.weights, "config.json")) as f:
        hf = json.load(f)
    cfg = llama3.ModelConfig(num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
                             embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
                             num_heads=hf["num_attention_heads"],
                             head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                             num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"]),
                             norm_eps=hf["rms_norm_eps"], weight_tying=bool(hf.get("tie_word_embeddings")))
    # Tunix 0.1.7's Llama 3 attention calls `apply_rope` without the config's rope_theta, so every model gets its
    # default of 1,000,000 (SmolLM2's is 100,000; Llama 3's 500,000): bind the config's, or it is another model
    llama3.apply_rope = functools.partial(llama3.apply_rope, rope_theta=cfg.rope_theta)
    model = params.create_model_from_safe_tensors(args.weights, cfg, dtype=jnp.float32)
    tok = transformers.AutoTokenizer.from_pretrained(args.weights)
    with open(args.prompts) as f:
        prompts = json.load(f)
    longest = max(len(tok(p, add_special_tokens=False).input_ids) for p in prompts)
    cache = sampler_lib.CacheConfig(cache_size=longest + args.new + 8, num_layers=cfg.num_layers,
                                    num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    sampler = sampler_lib.Sampler(model, tok, cache)
    run = lambda batch: sampler(batch, max_generation_steps=args.new, max_prompt_length=longest,
                                eos_tokens=args.eos, temperature=0.0)
    run(prompts[:args.batch])  # compiles every shape the timed calls use
    rows, start = [], time.perf_counter()
    for b in range(0, len(prompts), args.batch):
        out = run(prompts[b:b + args.batch])
        for tokens in out.tokens:
            tokens = [int(t) for t in tokens]
            rows.append(tokens[:next((k + 1 for k, t in enumerate(tokens) if t in args.eos), len(tokens))])
    seconds = time.perf_counter() - start
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "seconds": seconds}, f)


if __name__ == "__main__":
    main()
