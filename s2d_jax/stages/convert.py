"""Stage `convert`: the configured model as an HF directory (what transformers and `load_model` read)."""

from __future__ import annotations

import logging
import os

from ml_collections import ConfigDict

from s2d_jax.build import build_model, build_tokenizer
from s2d_jax.errors import S2DError
from s2d_jax.model import save_hf

log = logging.getLogger("s2d")


def convert(config: ConfigDict, workdir: str) -> str:
    """Stage `convert`: the configured model (HF directory, GGUF file or preset) as an HF directory with its
    tokenizer, which transformers and `load_model` both read."""
    out = config.convert.output or os.path.join(workdir, "converted")
    if os.path.exists(out):
        raise S2DError(f"{out}: already exists; not overwriting it (remove it or set --config.convert.output)")
    model = build_model(config, workdir=workdir)
    tok = build_tokenizer(config, workdir)
    save_hf(model, out, tokenizer=tok)
    log.info("wrote %s (%s, %.1fM parameters)", out, model.cfg.model_type, model.cfg.num_params / 1e6)
    return out
