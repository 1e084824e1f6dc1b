"""Train-step throughput: our jitted AdamW step vs a transformers/PyTorch step on the same model config, CPU.

Same decoder shape (default: SmolLM2-135M's, random weights), same batch and sequence length, fp32, AdamW, loss
on every token, same thread count. Prints tokens/s of both, the ratio, and MFU against a float32 matmul peak
measured in this run (a train step counts 3x the forward FLOPs).

    .venv/bin/python benchmarks/train.py [--preset smollm2-135m] [--batch 4] [--seq 256] [--steps 3]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2d_jax.config import defaults
from s2d_jax.flops import flops_per_token, matmul_peak
from s2d_jax.model import PRESETS, init_model
from s2d_jax.train.trainer import make_optimizer, train_step


def ours(cfg, batch, seq, steps, tokens):
    t = defaults().train
    t.learning_rate, t.clip_norm = 1e-4, 0.0
    model = init_model(cfg, seed=0)
    graphdef, state = nnx.split(model, nnx.Param)
    params = state.to_pure_dict()
    tx = make_optimizer(t)
    opt_state = tx.init(params)
    step = jax.jit(lambda p, o, b: train_step(graphdef, tx, p, o, b), donate_argnums=(0, 1))
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((batch, seq), np.float32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))}
    data = {k: jnp.asarray(v)[None] for k, v in data.items()}
    params, opt_state, m = step(params, opt_state, data)  # compile
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
        params, opt_state, m = step(params, opt_state, data)
    jax.block_until_ready(m)
    return batch * seq * steps / (time.perf_counter() - start), float(m["loss"])


def reference(cfg, batch, seq, steps, tokens):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    hf = transformers.AutoConfig.for_model(**cfg.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa").float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)

    def one():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # shifts inside: same token count +-1
        loss.backward()
        opt.step()
        return loss.item()

    one()  # warm up
    start = time.perf_counter()
    for _ in range(steps):
        loss = one()
    return batch * seq * steps / (time.perf_counter() - start), loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    cfg = PRESETS[args.preset].replace(max_position_embeddings=max(args.seq + 1, 2048))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    peak = matmul_peak()
    train_flops = 3 * flops_per_token(cfg, args.seq / 2)
    print(f"{args.preset}: {cfg.num_params / 1e6:.1f}M params, batch {args.batch} x {args.seq} tokens, fp32, "
          f"{os.cpu_count()} threads; float32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    ours_tps, ours_loss = ours(cfg, args.batch, args.seq, args.steps, tokens)
    print(f"ours:         {ours_tps:8.0f} tokens/s  MFU {train_flops * ours_tps / peak:6.1%}  (loss {ours_loss:.3f})")
    if not args.skip_torch:
        ref_tps, ref_loss = reference(cfg, args.batch, args.seq, args.steps, tokens)
        print(f"transformers: {ref_tps:8.0f} tokens/s  MFU {train_flops * ref_tps / peak:6.1%}  (loss {ref_loss:.3f})")
        print(f"ratio ours / transformers: {ours_tps / ref_tps:.2f}x")


if __name__ == "__main__":
    main()
