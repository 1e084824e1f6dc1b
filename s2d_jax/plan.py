"""`s2d plan`: per-device memory of a configured run, from shapes alone (no weights read, nothing allocated).

Parameters and AdamW moments are exact: every parameter's shard shape comes from the same logical-axis rules the
run uses. Gradients match parameters. The KV cache is exact for the sampler's largest batch (`generate.max_batch`
rows, the longest prompt bucket plus `program.max_new_tokens`). Training activations are an estimate (stated
below). The plan fails early, with advice, when the total exceeds `plan.device_gb`.
"""

from __future__ import annotations

import math
import types

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from s2d_jax import mesh as mesh_lib
from s2d_jax.errors import S2DError
from s2d_jax.model import PRESETS, Transformer, read_config
from s2d_jax.sampling.sampler import CACHE_AXES

GB = 1 << 30


def mesh_shape(m: ConfigDict, devices: int):
    """The (data, fsdp, tensor) mesh of `devices` devices as shapes only, as `make_mesh` would lay it out; the
    plan needs no real devices, so a laptop can plan a TPU pod."""
    return types.SimpleNamespace(shape=mesh_lib.mesh_sizes(m.data, m.fsdp, m.tensor, devices), size=devices)


def model_config(config: ConfigDict):
    m = config.model
    base = read_config(m.path) if m.path else PRESETS.get(m.preset)
    if base is None:
        raise S2DError(f"config key 'model.preset': {m.preset!r} is not a preset and 'model.path' is empty")
    return base.replace(param_dtype=m.dtype, dtype=m.compute_dtype or m.dtype, remat=config.train.remat)


def shard_bytes(shape, dtype, axes, mesh) -> int:
    """Bytes of one device's shard of an array laid out by the logical rules."""
    spec = mesh_lib.partition_spec(axes, shape, mesh)
    count = 1
    for dim, part in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if part is None else (part,) if isinstance(part, str) else part
        count *= dim // math.prod(mesh.shape[n] for n in names)
    return count * np.dtype(dtype).itemsize


def plan(config: ConfigDict, mesh) -> dict:
    cfg = model_config(config)
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    params = sum(shard_bytes(v.shape, v.dtype, mesh_lib.param_axes(v), mesh)
                 for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    t, g = config.train, config.generate
    rows_split = mesh.shape["data"] * mesh.shape["fsdp"]
    compute = np.dtype(cfg.dtype).itemsize
    # sampler: the largest batch, the prompt bucket of the longest task input (assumed <= train.max_len) + budget
    new = config.program.max_new_tokens or 256
    new_bucket = max(16, 1 << math.ceil(math.log2(new)))
    length = min(max(32, 1 << math.ceil(math.log2(t.max_len))) + new_bucket, cfg.max_position_embeddings)
    rows = max(g.max_batch, rows_split)
    kv_shape = (rows, cfg.num_kv_heads, length, cfg.head_dim)
    kv = 2 * cfg.num_layers * shard_bytes(kv_shape, cfg.dtype, CACHE_AXES, mesh)
    # training activations (estimate): per micro-batch row-token, each layer keeps ~ (34 d + 5 h T) * bytes
    # without remat (Korthikanti et al. 2022), the layer input alone with full remat; plus float32 logits twice
    tokens = t.batch_size // t.grad_accum // rows_split * t.max_len
    per_layer = (34 * cfg.hidden_size + 5 * cfg.num_heads * t.max_len) * compute
    if cfg.remat == "full":
        per_layer = cfg.hidden_size * compute
    elif cfg.remat == "dots":
        per_layer = 8 * cfg.hidden_size * compute
    activations = tokens * (cfg.num_layers * per_layer + 2 * 4 * cfg.vocab_size)
    train_total = params * 4 + activations  # params, grads, two AdamW moments (in the parameter dtype)
    return {"mesh": dict(mesh.shape), "devices": mesh.size, "num_params": cfg.num_params,
            "params": params, "grads": params, "optimizer": 2 * params, "activations_estimate": activations,
            "train_total": train_total, "kv_cache": kv, "kv_cache_shape": list(kv_shape),
            "generate_total": params + kv, "device_gb": config.plan.device_gb}


def advice(p: dict, config: ConfigDict) -> list[str]:
    limit = p["device_gb"] * GB
    out = []
    if p["train_total"] > limit:
        out.append(f"train needs {p['train_total'] / GB:.2f} GB per device, over {p['device_gb']} GB: raise mesh.fsdp "
                   f"(shards parameters and optimizer state), set train.remat=full, lower train.batch_size or raise "
                   f"train.grad_accum, or train in bfloat16 (model.dtype)")
    if p["generate_total"] > limit:
        out.append(f"generate needs {p['generate_total'] / GB:.2f} GB per device, over {p['device_gb']} GB: lower "
                   f"generate.max_batch, use a bfloat16 cache (model.compute_dtype=bfloat16), or raise mesh.tensor")
    return out


def report(p: dict) -> str:
    lines = [f"mesh {p['mesh']} ({p['devices']} devices), {p['num_params'] / 1e6:.1f}M parameters; per device:"]
    for key in ("params", "grads", "optimizer", "activations_estimate", "train_total", "kv_cache", "generate_total"):
        lines.append(f"  {key:<21} {p[key] / GB:10.4f} GB")
    return "\n".join(lines)
