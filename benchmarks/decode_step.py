"""Where a decode step's time goes: the engine's decode step (a call of CHUNK steps, as the engine makes them, per
step: every slot writes its own cache index) at batch B with a cache of S slots of which `live` hold tokens, against
the same step's matmuls alone (every layer's projections and the LM head as 2-D products on [B, d] rows, jitted,
measured in the same run).
Random weights at a preset's shape. Three steps: a cache of `--slots` with log-probabilities (the sampler before
stop 12: the whole budget preallocated), the same without, a cache of only the LIVE_BUCKET-rounded live slots
without (the engine now), and that cache in bfloat16 (`generate.cache_dtype`). Each column is the median of
`--reps` timings taken in rounds, one of each column per round, so that the machine's drift moves them alike.

    python benchmarks/decode_step.py --preset smollm2-135m --batches 32,64 --slots 512 --live 300
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from s2d_jax.model import KVCache, PRESETS, init_model  # noqa: E402
from s2d_jax.sampling.cache import LIVE_BUCKET  # noqa: E402
from s2d_jax.sampling.engine import CHUNK, Slots, decode  # noqa: E402
from s2d_jax.sampling.select import Greedy  # noqa: E402


def _medians(fns, reps: int) -> list[float]:
    """The median of `reps` timings of each of `fns` (after one untimed call each), the calls interleaved (one of
    each per round) so that the machine's drift during the run moves every column alike; a `fn` may time itself
    (returns seconds)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            own = fn()
            ts.append(own if own is not None else time.perf_counter() - t)
    return [float(np.median(ts)) for ts in times]


def matmuls_only(cfg, graphdef, state, batch: int):
    """One token's projections through every layer and the head as plain 2-D products `[B, in] @ [in, out]` (the
    layout XLA:CPU multiplies fastest; the MLP's gate and up as one product batched over their stacked halves, which
    XLA:CPU reads in place): the step's matmul work and nothing else."""

    @jax.jit
    def f(state, x):
        model = nnx.merge(graphdef, state)
        dt = x.dtype
        d = cfg.hidden_size
        rows = lambda w: w[...].astype(dt).reshape(d, -1)  # [d, out]
        cols = lambda w: w[...].astype(dt).reshape(-1, d)  # [in, d]
        for layer in model._layer_list():
            a, m = layer.attn, layer.mlp
            qkv = x @ rows(a.qkv)
            x = x + qkv[:, :cfg.num_kv_heads * cfg.group_size * cfg.head_dim] @ cols(a.o)
            w = m.gate_up[...].astype(dt)
            h = jnp.einsum("cnd,cdi->cni", jnp.broadcast_to(x, (2,) + x.shape), w)  # both halves in place
            x = x + (h[0] * h[1]) @ cols(m.down)
        return x @ model.head().astype(dt).T

    x = jnp.ones((batch, cfg.hidden_size), jnp.dtype(cfg.dtype)) * 0.01
    return lambda: (jax.block_until_ready(f(state, x)), None)[1]


def decode_step(cfg, graphdef, state, batch: int, slots: int, live: int, logprobs: bool, cache_dtype=None):
    dt = jnp.dtype(cache_dtype or cfg.dtype)
    shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
    rng = np.random.default_rng(0)
    ks = tuple(jnp.asarray(rng.normal(size=shape) * 0.1, dt) for _ in range(cfg.num_layers))
    vs = tuple(jnp.asarray(rng.normal(size=shape) * 0.1, dt) for _ in range(cfg.num_layers))
    valid = jnp.asarray(np.arange(slots)[None].repeat(batch, 0) < live)
    cache = KVCache(ks, vs, valid, jnp.full((batch,), live, jnp.int32))
    new = slots - live
    initial = Slots(jnp.zeros(batch, bool), jnp.zeros(batch, jnp.int32), jnp.full((batch,), new, jnp.int32),
                                jnp.zeros((batch, cfg.vocab_size), jnp.float32), jnp.full((batch,), live, jnp.int32),
                                jnp.zeros((batch, new), jnp.int32), jnp.zeros((batch, new), jnp.float32),
                    jax.random.split(jax.random.key(0), batch), cache)
    kwargs = dict(method=Greedy(), eos_ids=(-1,), pad_id=0, logprobs=logprobs)
    if new < CHUNK:
        raise SystemExit(f"a cache of {slots} slots with {live} live has no room for {CHUNK} steps")

    def run():  # one engine call of CHUNK steps from the same state (a fresh copy: decode donates it), per step
        slots = jax.block_until_ready(jax.tree.map(jnp.copy, initial))
        t = time.perf_counter()
        jax.block_until_ready(decode(graphdef, state, slots, jnp.int32(CHUNK), **kwargs))
        return (time.perf_counter() - t) / CHUNK

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--slots", type=int, default=512)
    ap.add_argument("--live", type=int, default=300)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    cfg = PRESETS[args.preset].replace(param_dtype=args.dtype, dtype=args.dtype)
    graphdef, state = nnx.split(init_model(cfg, seed=0))
    print(f"{args.preset} {args.dtype} on {jax.devices()[0].device_kind}, {os.cpu_count()} threads; cache "
          f"{args.slots} slots, {args.live} live")
    bucket = min(args.slots, -(-(args.live + CHUNK) // LIVE_BUCKET) * LIVE_BUCKET)
    print(f"{'batch':>5} {'matmuls ms':>10} {'all slots + logprobs':>20} {'ratio':>6} {'all slots':>9} {'ratio':>6} "
          f"{f'{bucket} slots':>16} {'ratio':>6} {f'{bucket}, bf16 cache':>16} {'ratio':>6}")
    for batch in map(int, args.batches.split(",")):
        mm, *times = _medians([matmuls_only(cfg, graphdef, state, batch)] + [
            decode_step(cfg, graphdef, state, batch, slots, args.live, lp, dt)
            for lp, slots, dt in ((True, args.slots, None), (False, args.slots, None), (False, bucket, None),
                                  (False, bucket, "bfloat16"))], args.reps)
        print(f"{batch:>5} {mm * 1e3:>10.1f} " + " ".join(f"{t * 1e3:>{w}.1f} {t / mm:>6.2f}"
                                                        for t, w in zip(times, (20, 9, 16, 16))))


if __name__ == "__main__":
    main()
