"""Sampler throughput: ours vs transformers' `generate` (torch, KV cache) on SmolLM2-135M-Instruct, fp32, CPU.

Same 32 chat prompts, 128 new greedy tokens, batch 8 / 32 / 64, same thread count. Prints tokens/s, the ratio,
and MFU (achieved FLOP/s over a float32 matmul peak measured in this run) for prefill and decode.

    .venv/bin/python benchmarks/sampler.py [--batches 8,32,64] [--new 128] [--skip-torch]
"""

import argparse
import os
import time

import jax
import numpy as np

import s2d_jax
from s2d_jax.assets import fetch_smollm2
from s2d_jax.flops import flops_per_token, matmul_peak
from s2d_jax.sampling.sampler import _prefill
from s2d_jax.tokenizer import chat_prompt

QUESTIONS = [f"Q{i}: " + q for i, q in enumerate([
    "What is the capital of France?", "Explain photosynthesis briefly.", "Write a haiku about the sea.",
    "List three prime numbers.", "What does a CPU do?", "Give me a tip for learning to cook.",
    "Why is the sky blue?", "Translate 'good morning' into Spanish."] * 4)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="8,32,64")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    path = fetch_smollm2()
    model, tok = s2d_jax.load_model(path), s2d_jax.load_tokenizer(path)
    cfg = model.cfg
    peak = matmul_peak()
    print(f"float32 matmul peak (best of 3 shapes, this run): {peak / 1e9:.0f} GFLOP/s; threads: {os.cpu_count()}")
    torch_model = None
    if not args.skip_torch:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count())
        d, f = os.path.split(path)
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    print(f"{'batch':>5} {'ours tok/s':>10} {'hf tok/s':>9} {'ratio':>6} {'decode MFU':>10} {'prefill MFU':>11}")
    for batch in map(int, args.batches.split(",")):
        prompts = (QUESTIONS * 4)[:max(batch, 32)]
        sampler = s2d_jax.Sampler(model, tok, max_batch=batch)
        sampler.generate(prompts[:batch], max_new_tokens=args.new, progress=False)  # compile
        t = time.perf_counter()
        out = sampler.generate(prompts, max_new_tokens=args.new, progress=False)
        ours_s = time.perf_counter() - t
        ours_tokens = sum(s.num_tokens for (s,) in out)
        # prefill alone, for its MFU
        ids = [tok(chat_prompt(tok, p), add_special_tokens=False).input_ids for p in prompts[:batch]]
        plen = max(32, 1 << (max(map(len, ids)) - 1).bit_length())
        tokens = np.zeros((batch, plen), np.int32)
        segs = np.ones((batch, plen), np.int32)
        pos = np.tile(np.arange(plen, dtype=np.int32), (batch, 1))
        run = lambda: jax.block_until_ready(_prefill(sampler.graphdef, sampler.state, tokens, pos, segs, n=1,
                                                     max_len=plen + args.new))
        run()
        t = time.perf_counter()
        run()
        prefill_s = time.perf_counter() - t
        prefill_flops = flops_per_token(cfg, plen / 2, head=False) * batch * plen + 2 * cfg.vocab_size * cfg.hidden_size * batch
        prefill_mfu = prefill_flops / prefill_s / peak  # logits only at each prompt's last position
        mean_ctx = np.mean([len(i) for i in ids]) + args.new / 2
        decode_mfu = flops_per_token(cfg, mean_ctx) * ours_tokens / ours_s / peak
        hf_rate = float("nan")
        if torch_model is not None:
            import torch

            tok.padding_side = "left"
            hf_tokens, t = 0, time.perf_counter()
            for b in range(0, len(prompts), batch):
                enc = tok([chat_prompt(tok, p) for p in prompts[b:b + batch]], return_tensors="pt", padding=True,
                          add_special_tokens=False)
                with torch.no_grad():
                    gen = torch_model.generate(**enc, max_new_tokens=args.new, do_sample=False,
                                               pad_token_id=tok.pad_token_id)[:, enc.input_ids.shape[1]:]
                for row in gen.tolist():
                    hf_tokens += next((k + 1 for k, x in enumerate(row) if x in sampler.eos_ids), len(row))
            hf_rate = hf_tokens / (time.perf_counter() - t)
        rate = ours_tokens / ours_s
        print(f"{batch:>5} {rate:>10.0f} {hf_rate:>9.0f} {rate / hf_rate:>6.2f} {decode_mfu:>10.1%} {prefill_mfu:>11.1%}")


if __name__ == "__main__":
    main()
