"""The decoder, its config and its checkpoints."""

from s2d_jax.model.config import PRESETS, SUPPORTED_MODEL_TYPES, ModelConfig
from s2d_jax.model.transformer import KVCache, Transformer
from s2d_jax.model.sources import read_config
from s2d_jax.model.weights import init_model, load_model, save_hf

__all__ = ["PRESETS", "SUPPORTED_MODEL_TYPES", "KVCache", "ModelConfig", "Transformer", "init_model",
           "load_model", "read_config", "save_hf"]
