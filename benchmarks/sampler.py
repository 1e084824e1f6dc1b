"""Sampler throughput: ours vs transformers' `generate` (torch, KV cache), same device, same prompts.

Default: SmolLM2-135M-Instruct (its GGUF), fp32, the same 64 chat prompts (the chat template on both sides),
128 new greedy tokens, batch 8 / 32 / 64; the share of rows whose tokens are identical on both sides is printed,
and where our call's seconds went (decode steps, prefill, inserts, cache resizes, compiles, host). With
`--preset NAME` (e.g. smollm2-135m, llama3.2-1b): random weights at that shape and a word-level tokenizer over
its vocabulary (every word one token), so any accelerator can run it offline; `--dtype bfloat16` on both sides.
Prints tokens/s, the ratio, MFU (achieved FLOP/s over a matmul peak measured in this run) for prefill and decode,
and on an accelerator the decode roofline: batch x memory bandwidth (a device copy measured now) / (weight bytes +
KV bytes read per step).

With `--tunix-python PY` (a Python whose environment has google-tunix: it pins other transformers versions than
ours, so it lives in a venv of its own, `make tunix-venv`), Tunix's greedy `Sampler` runs the same prompts on the
same weights (written as safetensors, loaded into Tunix's Llama 3 model; `benchmarks/tunix_sampler.py`, a process
of its own) in static batches, and its tokens/s, our ratio to it and the share of identical rows are printed too.

    .venv/bin/python benchmarks/sampler.py [--batches 8,32,64] [--new 128] [--skip-torch]
    .venv/bin/python benchmarks/sampler.py --preset llama3.2-1b --dtype bfloat16 --batches 32,64
    .venv/bin/python benchmarks/sampler.py --batches 32,64 --tunix-python .venv-tunix/bin/python
"""

import argparse
import json
import os
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import s2d_jax
from s2d_jax import assets
from s2d_jax.model.flops import flops_per_token, matmul_peak
from s2d_jax.sampling.cache import prefill as _prefill
from s2d_jax.sampling.clock import PHASES
from s2d_jax.tokenizer import chat_prompt

QUESTIONS = [f"Q{i}: " + q for i, q in enumerate([
    "What is the capital of France?", "Explain photosynthesis briefly.", "Write a haiku about the sea.",
    "List three prime numbers.", "What does a CPU do?", "Give me a tip for learning to cook.",
    "Why is the sky blue?", "Translate 'good morning' into Spanish."] * 8)]  # 64 distinct prompts


def word_tokenizer(vocab: int):
    """A real fast tokenizer whose every word `w<id>` is one token: random-weight models of any vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"w{vocab - 1}", pad_token="w0",
                                   chat_template=chat_template())


def chat_template():
    from s2d_jax.tokenizer import CHATML_TEMPLATE

    return CHATML_TEMPLATE.replace("<|im_start|>", "").replace("<|im_end|>", "").replace("\n", " ")


def bandwidth() -> float:
    """Device memory bandwidth (bytes read + written per second) of a large copy, measured now: the best of 5
    timings of 10 copies each (one H200 run read 10x low once; a single timing can catch the card mid-clock-up)."""
    x = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
    f = jax.jit(lambda x: x * 1.0001)
    f(x).block_until_ready()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            y = f(x)
        y.block_until_ready()
        best = max(best, 2 * x.nbytes * 10 / (time.perf_counter() - t))
    return best


def load_models(preset: str, dtype: str, with_torch: bool):
    """(ours, tokenizer, transformers' model or None) on the same weights: the SmolLM2 GGUF, or with `preset`
    random weights at that shape and a word-level tokenizer (no download)."""
    import torch

    if preset:
        from s2d_jax.model import PRESETS

        cfg = PRESETS[preset]
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype, eos_token_ids=(cfg.vocab_size - 1,))
        model, tok = s2d_jax.init_model(cfg, seed=0), word_tokenizer(cfg.vocab_size)
    else:
        path = assets.fetch("smollm2")
        model, tok = s2d_jax.load_model(path, dtype=dtype), s2d_jax.load_tokenizer(path)
    if not with_torch:
        return model, tok, None
    import transformers

    torch.set_num_threads(os.cpu_count())
    kw = dict(dtype=getattr(torch, dtype))
    if preset:
        s2d_jax.save_hf(model, "/tmp/s2d_bench_weights", overwrite=True)  # the same weights on both sides
        ref = transformers.AutoModelForCausalLM.from_pretrained("/tmp/s2d_bench_weights", **kw)
    else:
        d, f = os.path.split(path)
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, **kw)
    return model, tok, ref.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="8,32,64")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--preset", default="", help="random weights at this preset's shape (default: the SmolLM2 GGUF)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=64, help="chat prompts per call (every batch runs the same)")
    ap.add_argument("--cache-dtype", default="", help="the KV cache's dtype (default: the model's compute dtype)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--tunix-python", default="", help="a Python with google-tunix: Tunix's sampler beside ours")
    args = ap.parse_args()
    model, tok, torch_model = load_models(args.preset, args.dtype, not args.skip_torch)
    cfg = model.cfg
    peak = matmul_peak(args.dtype)
    print(f"{args.preset or 'SmolLM2-135M-Instruct'} {args.dtype} on {jax.devices()[0].device_kind}: matmul peak "
          f"{peak / 1e12:.2f} TFLOP/s (this run); threads: {os.cpu_count()}")
    roof = None
    if jax.default_backend() != "cpu":
        roof = bandwidth()
        print(f"memory bandwidth (copy, this run): {roof / 1e12:.2f} TB/s")
    if args.preset:
        rng = np.random.default_rng(0)
        questions = [" ".join(f"w{i}" for i in rng.integers(1, cfg.vocab_size - 1, rng.integers(20, 60)))
                     for _ in range(args.prompts)]
    else:
        questions = QUESTIONS
    print(f"{'batch':>5} {'ours tok/s':>10} {'hf tok/s':>9} {'ratio':>6} {'same tokens':>11} {'decode MFU':>10} "
          f"{'prefill MFU':>11}" + (f" {'roofline tok/s':>14} {'of roofline':>11}" if roof else "")
          + "  the call's seconds: " + " ".join(PHASES))
    prompts = questions[:args.prompts]
    batches, ours = list(map(int, args.batches.split(","))), {}
    for batch in batches:  # ours first at every batch, then transformers': torch's idle threads spin for a while
        sampler = s2d_jax.Sampler(model, tok, max_batch=batch, cache_dtype=args.cache_dtype or None)
        sampler.generate(prompts, max_new_tokens=args.new, progress=False, chat=True)  # every shape compiled
        t = time.perf_counter()
        out = sampler.generate(prompts, max_new_tokens=args.new, progress=False, chat=True)
        ours[batch] = (out, time.perf_counter() - t, sampler.last_stats, sampler)
    hf = {b: _transformers(torch_model, tok, prompts, b, args.new, sampler.eos_ids) if torch_model else None
          for b in batches}
    tunix = _tunix(args.tunix_python, model, tok, prompts, batches, args.new, sampler.eos_ids)
    ids = [tok(chat_prompt(tok, p), add_special_tokens=False).input_ids for p in prompts]
    mean_ctx = np.mean([len(i) for i in ids]) + args.new / 2
    for batch in batches:
        out, ours_s, breakdown, sampler = ours[batch]
        ours_tokens = sum(s.num_tokens for (s,) in out)
        prefill_mfu = _prefill_mfu(sampler, ids[:batch], args.new, peak)
        decode_mfu = flops_per_token(cfg, mean_ctx) * ours_tokens / ours_s / peak
        hf_rate, same = float("nan"), float("nan")
        if hf[batch]:
            hf_rows, hf_s = hf[batch]
            hf_rate = sum(map(len, hf_rows)) / hf_s
            same = np.mean([s.token_ids == row for (s,), row in zip(out, hf_rows)])
        rate = ours_tokens / ours_s
        line = (f"{batch:>5} {rate:>10.0f} {hf_rate:>9.0f} {rate / hf_rate:>6.2f} {same:>11.1%} {decode_mfu:>10.1%} "
                f"{prefill_mfu:>11.1%}")
        if roof:  # a decode step reads every weight and the live KV cache once
            weights = cfg.num_params * np.dtype(cfg.dtype).itemsize
            kv = (2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(sampler.cache_dtype).itemsize
                  * batch * mean_ctx)
            ceiling = batch * roof / 2 / (weights + kv)  # the copy counted bytes read + written
            line += f" {ceiling:>14.0f} {rate / ceiling:>11.1%}"
        sec = breakdown["seconds"]
        print(line + "  " + " ".join(f"{k} {sec[k]:.2f} ({sec[k] / breakdown['wall_s']:.0%})" for k in PHASES)
              + f"; {breakdown['steps']} steps, {breakdown['compiles']} compiles")
        if tunix:
            rows, seconds = tunix[batch]
            strip = lambda ids: [t for t in ids if t not in sampler.eos_ids]  # Tunix's rows end before the EOS
            same_tunix = np.mean([strip(s.token_ids) == strip(row) for (s,), row in zip(out, rows)])
            tunix_rate = sum(len(strip(r)) for r in rows) / seconds
            ours_rate = sum(len(strip(s.token_ids)) for (s,) in out) / ours_s
            print(f"{'':>5} tunix {tunix_rate:.0f} tok/s; ours / tunix {ours_rate / tunix_rate:.2f}; same tokens as "
                  f"tunix {same_tunix:.1%} (tokens counted without EOS on both sides)")

def _tunix(python: str, model, tok, prompts, batches, new: int, eos_ids) -> dict | None:
    """batch -> (Tunix's rows, seconds), each batch size in a process of its own on the same weights and prompts."""
    if not python:
        return None
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights")
        s2d_jax.save_hf(model, weights, overwrite=True)
        tok.save_pretrained(weights)
        with open(os.path.join(tmp, "prompts.json"), "w") as f:
            json.dump([chat_prompt(tok, p) for p in prompts], f)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tunix_sampler.py")
        for batch in batches:
            result = os.path.join(tmp, f"tunix-{batch}.json")
            subprocess.run([python, script, "--weights", weights, "--prompts", os.path.join(tmp, "prompts.json"),
                            "--batch", str(batch), "--new", str(new), "--eos", *map(str, eos_ids), "--out", result],
                           check=True, env={**os.environ, "JAX_PLATFORMS": jax.default_backend()})
            with open(result) as f:
                found = json.load(f)
            out[batch] = (found["rows"], found["seconds"])
    return out


def _prefill_mfu(sampler, ids, new: int, peak: float) -> float:
    """Prefill alone at the call's first batch: achieved matmul FLOP/s over the peak."""
    batch, cfg = len(ids), sampler.model.cfg
    plen = max(32, 1 << (max(map(len, ids)) - 1).bit_length())
    tokens = np.zeros((batch, plen), np.int32)
    segs = np.ones((batch, plen), np.int32)
    pos = np.tile(np.arange(plen, dtype=np.int32), (batch, 1))
    run = lambda: jax.block_until_ready(_prefill(sampler.graphdef, sampler.state, tokens, pos, segs,
                                                 max_len=plen + new))
    run()
    t = time.perf_counter()
    run()
    prefill_s = time.perf_counter() - t
    flops = flops_per_token(cfg, plen / 2, head=False) * batch * plen + 2 * cfg.vocab_size * cfg.hidden_size * batch
    return flops / prefill_s / peak  # logits only at each prompt's last position


def _transformers(torch_model, tok, prompts, batch: int, new: int, eos_ids) -> tuple[list[list[int]], float]:
    """transformers' greedy `generate` over `prompts` in static batches of `batch` (chat template, left padding):
    each row's tokens up to its EOS, and the seconds (after a warm-up batch)."""
    import torch

    device = torch_model.device
    tok.padding_side = "left"
    encode = lambda ps: tok([chat_prompt(tok, p) for p in ps], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
    run = lambda enc: torch_model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        run(encode(prompts[:batch]))  # warm up (CUDA context, kernels), as ours was compiled first
        rows, t = [], time.perf_counter()
        for b in range(0, len(prompts), batch):
            enc = encode(prompts[b:b + batch])
            for row in run(enc)[:, enc.input_ids.shape[1]:].tolist():
                rows.append(row[:next((k + 1 for k, x in enumerate(row) if x in eos_ids), len(row))])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return rows, time.perf_counter() - t

if __name__ == "__main__":
    main()
