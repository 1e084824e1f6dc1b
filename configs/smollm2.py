"""SmolLM2-135M-Instruct from its GGUF (fetched by `make fixtures` into $S2D_CACHE); runs on a laptop CPU."""

from ml_collections import ConfigDict

from s2d_jax.assets import SMOLLM2_GGUF


def get_config():
    return ConfigDict({
        "model": {"path": SMOLLM2_GGUF},
        "mesh": {"data": 1},
    })
