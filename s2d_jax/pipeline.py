"""The stages of `s2d`, each a function of (config, workdir) that writes its artifact atomically."""

from __future__ import annotations

import logging
import os

from ml_collections import ConfigDict

from s2d_jax import mesh as mesh_lib
from s2d_jax.errors import S2DError
from s2d_jax.model import PRESETS, init_model, load_model, save_hf
from s2d_jax.tokenizer import load_tokenizer

log = logging.getLogger("s2d")


def build_mesh(config: ConfigDict):
    """The configured mesh, or None for a single device (no sharding annotations at all)."""
    m = config.mesh
    mesh = mesh_lib.make_mesh(m.data, m.fsdp, m.tensor)
    return None if mesh.size == 1 else mesh


def build_model(config: ConfigDict, mesh=None):
    """The model the config names: the checkpoint at `model.path`, or a random `model.preset` seeded by `seed`."""
    m = config.model
    compute = m.compute_dtype or m.dtype
    if m.path:
        return load_model(m.path, dtype=m.dtype, compute_dtype=compute, mesh=mesh)
    if m.preset not in PRESETS:
        raise S2DError(f"config key 'model.preset': {m.preset!r} is not a preset (presets: {', '.join(PRESETS)}); "
                       f"or set 'model.path' to a checkpoint")
    return init_model(PRESETS[m.preset].replace(param_dtype=m.dtype, dtype=compute), seed=config.seed, mesh=mesh)


def build_tokenizer(config: ConfigDict):
    path = config.tokenizer or config.model.path
    if not path:
        raise S2DError("config key 'tokenizer': empty, and 'model.path' is empty too (set one, or 'bytes')")
    return load_tokenizer(path)


def convert(config: ConfigDict, workdir: str) -> str:
    """Stage `convert`: the configured model (HF directory, GGUF file or preset) as an HF directory with its
    tokenizer, which transformers and `load_model` both read."""
    out = config.convert.output or os.path.join(workdir, "converted")
    if os.path.exists(out):
        raise S2DError(f"{out}: already exists; not overwriting it (remove it or set --config.convert.output)")
    model = build_model(config)
    tok = build_tokenizer(config)
    save_hf(model, out, tokenizer=tok)
    log.info("wrote %s (%s, %.1fM parameters)", out, model.cfg.model_type, model.cfg.num_params / 1e6)
    return out


STAGES = {"convert": convert}
