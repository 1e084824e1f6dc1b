"""Train-step throughput: our jitted step vs a transformers/PyTorch step of the same shape, same device.

Same decoder shape (random weights), batch and sequence length, AdamW, loss on every token. `--dtype bfloat16`
computes in bf16 on both sides with float32 master weights (ours: `model.compute_dtype`; torch: autocast), with
PyTorch's SDPA attention. `--lora R` trains rank-R adapters on every projection of a frozen base held in the
compute dtype (ours: `s2d_jax.model.lora`; torch: peft). Prints tokens/s of both, the ratio, MFU against a matmul
peak measured in this run (a full step counts 3x the forward FLOPs, a LoRA step 2x: no weight gradients) and, on
an accelerator, peak device memory.

    .venv/bin/python benchmarks/train.py [--preset smollm2-135m] [--batch 4] [--seq 256] [--steps 3]
                                         [--dtype float32|bfloat16] [--lora 0] [--skip-torch]
"""

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax.config import defaults
from s2d_jax.model.flops import flops_per_token, matmul_peak
from s2d_jax.model import PRESETS, init_model, lora
from s2d_jax.train.trainer import make_optimizer, train_step


def _peak_memory_gb(stats):
    return (stats or {}).get("peak_bytes_in_use", float("nan")) / 2**30


def ours(cfg, args, tokens):
    t = defaults().train
    t.learning_rate, t.clip_norm = 1e-4, 0.0
    param_dtype = args.dtype if args.lora else "float32"  # LoRA: frozen base in the compute dtype
    model = init_model(cfg.replace(param_dtype=param_dtype, dtype=args.dtype), seed=0)
    if args.lora:
        lora.add(model, args.lora, 2.0 * args.lora)
    graphdef, params, frozen = lora.split_trainable(model)
    params, frozen = params.to_pure_dict(), None if frozen is None else frozen.to_pure_dict()
    tx = make_optimizer(t)
    opt_state = tx.init(params)
    step = jax.jit(functools.partial(train_step, graphdef, tx, chunk=args.loss_chunk, right_padded=True),
                   donate_argnums=(0, 1))
    b, s = args.batch, args.seq
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, s), np.float32),
            "segment_ids": np.ones((b, s), np.int32),
            "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))}
    data = {k: jnp.asarray(v)[None] for k, v in data.items()}
    params, opt_state, m = step(params, opt_state, data, frozen)  # compile
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(args.steps):
        params, opt_state, m = step(params, opt_state, data, frozen)
    jax.block_until_ready(m)
    rate = b * s * args.steps / (time.perf_counter() - start)
    return rate, float(m["loss"]), _peak_memory_gb(jax.devices()[0].memory_stats())


def reference(cfg, args, tokens):
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count())
    hf = transformers.AutoConfig.for_model(**cfg.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa").float().to(device).train()
    if args.lora:
        import peft

        model = model.to(getattr(torch, args.dtype))
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora, lora_alpha=2 * args.lora,
                                                           target_modules=list(lora.TARGETS)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0, fused=device == "cuda")
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def one():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # shifts inside: same token count +-1
        loss.backward()
        opt.step()
        return loss

    one()  # warm up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = one()
    loss = loss.item()
    rate = args.batch * args.seq * args.steps / (time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return rate, loss, memory


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    ap.add_argument("--loss-chunk", type=int, default=128)
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    cfg = PRESETS[args.preset].replace(max_position_embeddings=max(args.seq + 1, 2048))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    peak = matmul_peak(args.dtype, reps=3)
    train_flops = (2 if args.lora else 3) * flops_per_token(cfg, args.seq / 2)
    kind = f"LoRA r={args.lora}" if args.lora else "full"
    print(f"{args.preset} ({kind}): {cfg.num_params / 1e6:.1f}M params, batch {args.batch} x {args.seq} tokens, "
          f"{args.dtype} compute on {jax.devices()[0].device_kind}; {args.dtype} matmul peak "
          f"{peak / 1e12:.2f} TFLOP/s (measured now)")
    rate, loss, memory = ours(cfg, args, tokens)
    print(f"ours:         {rate:9.0f} tokens/s  MFU {train_flops * rate / peak:6.1%}  peak {memory:6.2f} GiB  "
          f"(loss {loss:.3f})")
    if not args.skip_torch:
        ref_rate, ref_loss, ref_memory = reference(cfg, args, tokens)
        print(f"transformers: {ref_rate:9.0f} tokens/s  MFU {train_flops * ref_rate / peak:6.1%}  peak "
              f"{ref_memory:6.2f} GiB  (loss {ref_loss:.3f})")
        print(f"ratio ours / transformers: {rate / ref_rate:.2f}x")


if __name__ == "__main__":
    main()
