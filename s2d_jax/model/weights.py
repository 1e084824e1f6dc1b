"""Checkpoints in and out: HF safetensors directories and GGUF files in (`sources.py`), HF safetensors out.

One table (`layout.hf_layout`) says, for every parameter of ours, which HF tensors it is made of and how to
convert each way; loading and saving both read it. With a mesh, one parameter at a time is read on host and each
device receives only its own shard.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from s2d_jax import mesh as mesh_lib
from s2d_jax.runtime import distributed
from s2d_jax.artifacts import atomic_dir
from s2d_jax.errors import S2DError
from s2d_jax.model import hub
from s2d_jax.model.config import ModelConfig
from s2d_jax.model.layout import hf_layout
from s2d_jax.model.sources import open_checkpoint
from s2d_jax.model.transformer import Transformer

# Buffers some HF checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# ------------------------------------------------------------------------------------------ load / save


def _stacked(cfg: ModelConfig, key: tuple) -> bool:
    return cfg.scan_layers and key[0] == "layers"


def _per_layer(cfg: ModelConfig, key: tuple) -> list[tuple]:
    """The `hf_layout` keys that our parameter `key` holds: itself, or with scanned layers one per layer."""
    if _stacked(cfg, key):
        return [("layers", n) + key[1:] for n in range(cfg.num_layers)]
    return [key]


def load_model(path: str, dtype: str = "float32", mesh=None, compute_dtype: str | None = None,
               scan_layers: bool = False, revision: str = "") -> Transformer:
    """The model at `path` (an HF directory, a `.gguf` file, or a hub id such as `org/name` at `revision`) with
    parameters in `dtype`, placed on `mesh` by the logical-axis rules if given; `scan_layers` stacks the layers'
    parameters for `lax.scan`."""
    path = hub.resolve(path, revision)
    source = open_checkpoint(path)
    cfg = source.config.replace(param_dtype=dtype, dtype=compute_dtype or dtype, scan_layers=scan_layers)
    layout = hf_layout(cfg)
    expected = {n for e in layout.values() for n in e.names}
    available = source.names()
    missing = sorted(expected - available)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise S2DError(f"{path}: missing tensor {missing[0]!r}{more}")
    extra = {n for n in available - expected if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_embeddings:
        extra.discard("lm_head.weight")  # some tied checkpoints still store the head
    if extra:
        name = sorted(extra)[0]
        raise S2DError(f"{source.describe(name)}: unexpected tensor {name!r}, not part of a {cfg.model_type} model "
                       f"with this config.json")
    for entry in layout.values():
        for name, shape in zip(entry.names, entry.hf_shapes):
            if source.shape(name) != shape:
                raise S2DError(f"{source.describe(name)}: tensor {name!r} has shape {source.shape(name)}, "
                               f"expected {shape} from the model config")

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    flat = dict(nnx.to_flat_state(state))
    np_dtype = jnp.dtype(dtype)
    for key, var in tqdm(flat.items(), desc=f"loading {os.path.basename(path.rstrip('/'))}", unit="tensor",
                         leave=False, disable=len(flat) < 50):
        parts = [layout[k].to_ours(*(source.get(n) for n in layout[k].names)).astype(np_dtype)
                 for k in _per_layer(cfg, key)]
        value = np.ascontiguousarray(np.stack(parts) if _stacked(cfg, key) else parts[0])
        if mesh is None:
            array = jnp.asarray(value)
        else:
            sharding = mesh_lib.named_sharding(mesh_lib.param_axes(var), value.shape, mesh)
            array = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
        flat[key] = var.replace(array)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_hf(model: Transformer, out_dir: str, tokenizer=None, max_shard_bytes: int = 2 << 30,
            overwrite: bool = False) -> str:
    """Write `model` as an HF directory (config.json + safetensors, sharded above `max_shard_bytes`).

    Written into a temporary directory beside `out_dir` and renamed when complete, so a killed save never leaves
    a directory that looks finished. An existing `out_dir` is replaced only with `overwrite=True`.
    """
    from safetensors.numpy import save_file
    from transformers import AutoConfig

    from s2d_jax.model import lora

    model = lora.merged(model)  # with LoRA adapters: their updates added to the base weights
    out_dir = os.path.abspath(os.fspath(out_dir))
    # decided by all hosts together, before host 0 writes: a host arriving after host 0's rename would otherwise
    # see the new directory, refuse, and leave host 0 waiting at the barrier below
    if distributed.agree([os.path.exists(out_dir)])[0] and not overwrite:
        raise S2DError(f"{out_dir}: already exists; not overwriting it (pass overwrite=True, or choose another path)")
    if not distributed.primary():  # every host joins the gathers of `fetch`; the first host writes
        for _, var in nnx.to_flat_state(nnx.state(model)):
            distributed.fetch(var[...])
        distributed.barrier(f"save_hf {out_dir}")
        return out_dir
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        cfg = model.cfg
        layout = hf_layout(cfg)
        itemsize = jnp.dtype(cfg.param_dtype).itemsize
        # plan shards from shapes alone, then write one shard at a time
        shards, size = [[]], 0
        for key in (k for k, _ in nnx.to_flat_state(nnx.state(model))):
            nbytes = sum(int(np.prod(s)) for k in _per_layer(cfg, key) for s in layout[k].hf_shapes) * itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(key)
            size += nbytes
        flat = dict(nnx.to_flat_state(nnx.state(model)))
        files = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))]
        weight_map, total = {}, 0
        for fname, keys in zip(files, shards):
            tensors = {}
            for key in keys:
                value = distributed.fetch(flat[key][...])  # on every host: a collective when multi-host
                for n, k in enumerate(_per_layer(cfg, key)):
                    part = value[n] if _stacked(cfg, key) else value
                    for name, tensor in zip(layout[k].names, layout[k].to_hf(part)):
                        tensors[name] = np.ascontiguousarray(tensor)
                        weight_map[name] = fname
                        total += tensor.nbytes
            save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
        if len(files) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        hf = cfg.to_hf()
        AutoConfig.for_model(hf.pop("model_type"), **hf).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    distributed.barrier(f"save_hf {out_dir}")
    return out_dir


def init_model(cfg: ModelConfig, seed: int = 0, mesh=None) -> Transformer:
    """A randomly initialised model (tests, the toy demo), placed on `mesh` if given."""
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    return model if mesh is None else mesh_lib.shard_model(model, mesh)
