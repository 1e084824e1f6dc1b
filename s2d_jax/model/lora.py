"""LoRA (Hu et al. 2021) on the decoder's projections, written on NNX, in PEFT's terms.

Why our own rather than qwix: our projections are fused (`qkv`, `gate_up`) while PEFT adapts each HF module
(`q_proj`, `k_proj`, ...) separately; the adapters must be PEFT's, one per HF module, to export an adapter that
`peft` loads over the base model. So each target holds `a: [in..., r]` and `b: [r, out...]` in our layouts, the
forward adds `alpha / r * (x a) b` to that module's output, and the export reshapes them to PEFT's `lora_A`
`[r, in]` and `lora_B` `[out, r]`. Adapters are `LoRAParam`s (a kind of `nnx.Param`), so the trainer can split
them from the frozen base weights, and they are kept in float32 whatever the compute dtype.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2d_jax.errors import S2DError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Checkpoints that fuse projections (Phi-3) have PEFT modules of the fused names: one adapter per fused module.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class LoRAParam(nnx.Param):
    """A LoRA adapter weight: trainable while the base `nnx.Param`s stay frozen."""


class LoRA(nnx.Module):
    """`x -> scale * (x . a) . b`; `layers` > 0 stacks one adapter per layer (for scanned layers)."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, rank: int, alpha: float, key, layers: int = 0):
        lead, lead_axes = ((layers,), ("layers",)) if layers else ((), ())
        fan_in = math.prod(in_shape)
        a = jax.random.uniform(key, lead + tuple(in_shape) + (rank,), jnp.float32, -1.0, 1.0) / math.sqrt(fan_in)
        self.a = LoRAParam(a, axes=lead_axes + tuple(in_axes) + (None,))
        self.b = LoRAParam(jnp.zeros(lead + (rank,) + tuple(out_shape), jnp.float32),
                           axes=lead_axes + (None,) + tuple(out_axes))
        self.scale = alpha / rank
        self.in_ndim = len(in_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        h = jnp.tensordot(x, self.a[...].astype(dt), axes=self.in_ndim)
        return jnp.tensordot(h, self.b[...].astype(dt), axes=1) * jnp.asarray(self.scale, dt)

    def delta(self) -> jax.Array:
        """The dense update `scale * a b` `[(layers,) in..., out...]` (float32)."""
        a, b = self.a[...], self.b[...]
        if a.ndim > self.in_ndim + 1:  # stacked
            return jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b) * self.scale
        return jnp.tensordot(a, b, axes=1) * self.scale


def shapes(cfg) -> dict[str, tuple]:
    """target -> (in shape, out shape, in axes, out axes) in our layouts."""
    d, k, g, hd, i = cfg.hidden_size, cfg.num_kv_heads, cfg.group_size, cfg.head_dim, cfg.intermediate_size
    return {
        "q_proj": ((d,), (k, g, hd), ("embed",), ("kv_heads", None, None)),
        "k_proj": ((d,), (k, hd), ("embed",), ("kv_heads", None)),
        "v_proj": ((d,), (k, hd), ("embed",), ("kv_heads", None)),
        "o_proj": ((k, g, hd), (d,), ("kv_heads", None, None), ("embed",)),
        "gate_proj": ((d,), (i,), ("embed",), ("mlp",)),
        "up_proj": ((d,), (i,), ("embed",), ("mlp",)),
        "down_proj": ((i,), (d,), ("mlp",), ("embed",)),
        "qkv_proj": ((d,), (k, g + 2, hd), ("embed",), ("kv_heads", None, None)),
        "gate_up_proj": ((d,), (2, i), ("embed",), (None, "mlp")),
    }


def _owner(target: str) -> str:
    return "mlp" if target in ("gate_proj", "up_proj", "down_proj", "gate_up_proj") else "attn"


def _slot(block, target: str) -> tuple:
    """(the module holding `target`'s adapter, its attribute name), e.g. (block.attn, "lora_q")."""
    return getattr(block, _owner(target)), "lora_" + target.removesuffix("_proj")


def check_targets(targets, cfg=None) -> tuple[str, ...]:
    """The PEFT module names to adapt in a model of `cfg`: a fused checkpoint's q/k/v (gate/up) are one module,
    adapted when all its parts are asked for."""
    targets = tuple(targets)
    known = TARGETS + tuple(FUSED)
    bad = [t for t in targets if t not in known]
    if bad or not targets:
        raise S2DError(f"config key 'train.lora_targets': {bad[0] if bad else '()'!r} is not a LoRA target "
                       f"(targets: {', '.join(known)})")
    fused = bool(cfg and cfg.fused_checkpoint)
    out = []
    for t in targets:
        whole = next((f for f, parts in FUSED.items() if t in parts), None) if fused else None
        if fused and whole:
            if not set(FUSED[whole]) <= set(targets):
                raise S2DError(f"config key 'train.lora_targets': {cfg.model_type} fuses {', '.join(FUSED[whole])} "
                               f"into {whole}; target {whole} (or all of its parts)")
            t = whole
        elif not fused and t in FUSED:
            raise S2DError(f"config key 'train.lora_targets': {t!r} is fused only in Phi-3 checkpoints; "
                           f"a {cfg.model_type if cfg else 'model'} has {', '.join(FUSED[t])}")
        if t not in out:
            out.append(t)
    return tuple(out)


def add(model, rank: int, alpha: float, targets=TARGETS, seed: int = 0, mesh=None):
    """Give `model` (in place) zero-initialised adapters on `targets` (B = 0, so it computes what it did)."""
    from s2d_jax import mesh as mesh_lib
    from s2d_jax.runtime import distributed

    cfg = model.cfg
    targets = check_targets(targets, cfg)
    if rank < 1:
        raise S2DError(f"config key 'train.lora_rank': {rank}; LoRA needs a rank >= 1")
    table = shapes(cfg)
    key = jax.random.key(seed)
    blocks = [model.layers] if cfg.scan_layers else list(model.layers)
    for n, block in enumerate(blocks):
        for target in targets:
            key, sub = jax.random.split(key)
            adapter = LoRA(*table[target], rank=rank, alpha=alpha, key=sub,
                           layers=cfg.num_layers if cfg.scan_layers else 0)
            setattr(*_slot(block, target), adapter)
    model.cfg = cfg.replace(lora_rank=rank, lora_alpha=float(alpha), lora_targets=targets)
    if mesh is not None:  # adapters laid out by the same logical rules as the base weights
        state = nnx.state(model, LoRAParam)
        nnx.update(model, jax.tree.map(distributed.put, state, mesh_lib.state_shardings(state, mesh)))
    return model


def split_trainable(model):
    """`(graphdef, trainable, frozen)` states: with adapters, they train and the base is frozen; without, every
    parameter trains and `frozen` is None."""
    lora = bool(model.cfg.lora_rank)
    graphdef, trainable, frozen = nnx.split(model, LoRAParam if lora else nnx.Param, ...)
    return graphdef, trainable, frozen if lora else None


def adapters(model) -> dict[tuple, LoRA]:
    """(layer index or None when stacked, target) -> adapter."""
    out = {}
    blocks = [(None, model.layers)] if model.cfg.scan_layers else list(enumerate(model.layers))
    for n, block in blocks:
        for target in model.cfg.lora_targets:
            out[(n, target)] = getattr(*_slot(block, target))
    return out


def merged(model):
    """A copy of `model` with every adapter's update added to its base weight and no adapters (what eval and
    transformers load). Updates are added in float32, then cast to the base dtype."""
    cfg = model.cfg
    if not cfg.lora_rank:
        return model
    g = cfg.group_size
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)  # a fresh copy of the same arrays
    for (n, target), adapter in adapters(out).items():
        block = out.layers if n is None else out.layers[n]
        delta = adapter.delta()
        owner, name = _slot(block, target)
        lead = (slice(None),) if n is None else ()
        if target in FUSED:
            w = owner.qkv if target == "qkv_proj" else owner.gate_up
            if target == "gate_up_proj":  # the adapter's [embed, 2, mlp] onto our [2, embed, mlp]
                delta = jnp.moveaxis(delta, -3, -2)
            w[...] = (w[...].astype(jnp.float32) + delta).astype(w[...].dtype)
        elif target in ("q_proj", "k_proj", "v_proj"):
            w = owner.qkv
            where = {"q_proj": slice(0, g), "k_proj": g, "v_proj": g + 1}[target]
            index = lead + (slice(None), slice(None), where)
            w[...] = w[...].at[index].add(delta.astype(w[...].dtype))
        elif target in ("gate_proj", "up_proj"):
            w = owner.gate_up
            index = lead + (0 if target == "gate_proj" else 1,)
            w[...] = w[...].at[index].add(delta.astype(w[...].dtype))
        else:
            w = owner.o if target == "o_proj" else owner.down
            w[...] = (w[...].astype(jnp.float32) + delta).astype(w[...].dtype)
        setattr(owner, name, None)
    out.cfg = cfg.replace(lora_rank=0, lora_targets=())
    return out


def save_peft(model, out_dir: str, base_model: str = "", overwrite: bool = False) -> str:
    """Write the adapters as a PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`) that
    `peft.PeftModel.from_pretrained(base, out_dir)` loads over the base model in transformers. Atomic."""
    from safetensors.numpy import save_file

    from s2d_jax.runtime import distributed
    from s2d_jax.artifacts import atomic_dir

    cfg = model.cfg
    tensors = {}
    for (n, target), adapter in adapters(model).items():
        a, b = distributed.fetch(adapter.a[...]), distributed.fetch(adapter.b[...])
        layers = range(cfg.num_layers) if n is None else [n]
        for j, layer in enumerate(layers):
            aj, bj = (a[j], b[j]) if n is None else (a, b)
            owner = "mlp" if _owner(target) == "mlp" else "self_attn"
            module = f"base_model.model.model.layers.{layer}.{owner}.{target}"
            tensors[module + ".lora_A.weight"] = np.ascontiguousarray(aj.reshape(-1, cfg.lora_rank).T)
            if target == "qkv_proj":  # our [r, kv_heads, group + 2, hd] -> PEFT's rows [q; k; v]
                g = cfg.group_size
                bj = np.concatenate([bj[:, :, :g].reshape(cfg.lora_rank, -1), bj[:, :, g].reshape(cfg.lora_rank, -1),
                                     bj[:, :, g + 1].reshape(cfg.lora_rank, -1)], 1)
            tensors[module + ".lora_B.weight"] = np.ascontiguousarray(bj.reshape(cfg.lora_rank, -1).T)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
              "target_modules": sorted(cfg.lora_targets), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False, "base_model_name_or_path": base_model or None}
    if not distributed.primary():
        distributed.barrier(f"save_peft {out_dir}")
        return out_dir
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
    distributed.barrier(f"save_peft {out_dir}")
    return out_dir
