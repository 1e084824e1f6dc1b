"""ModelConfig: one frozen record of the decoder's shape and family quirks, read from an HF `config.json`.

Family differences are fields, not code paths: Qwen2 is `qkv_bias=True`; Gemma is `norm_plus_one`,
`embed_scale`, `activation='gelu_tanh'` and tied embeddings; Mistral adds `sliding_window`; Llama 3 adds
`rope_scaling`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from s2d_jax.errors import S2DError

SUPPORTED_MODEL_TYPES = ("gemma", "llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings), ("linear", factor)
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 2048
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qkv_bias: bool = False
    o_bias: bool = False
    tie_embeddings: bool = False
    norm_plus_one: bool = False  # Gemma's RMSNorm scales by (1 + w)
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    remat: str = "none"  # training only: none | full | dots (rematerialise each layer in the backward pass)
    scan_layers: bool = False  # parameters stacked [layers, ...] and run under lax.scan (flat compile time)
    attention: str = "auto"  # auto (by backend) | reference | blockwise | cudnn | splash: see attention.py
    lora_rank: int = 0  # > 0: LoRA adapters on lora_targets (added by lora.add, which sets these three)
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise S2DError(f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
        if self.remat not in REMAT:
            raise S2DError(f"remat={self.remat!r}: expected one of {', '.join(REMAT)}")
        from s2d_jax.model.attention import IMPLEMENTATIONS

        if self.attention not in IMPLEMENTATIONS:
            raise S2DError(f"attention={self.attention!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise S2DError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(DTYPES)}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        d, h, k, hd, i = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        attn = d * (h + 2 * k) * hd + h * hd * d + (self.qkv_bias and (h + 2 * k) * hd) + (self.o_bias and d)
        layer = attn + 3 * d * i + 2 * d
        return self.vocab_size * d * (1 if self.tie_embeddings else 2) + self.num_layers * layer + d

    # ---------------------------------------------------------------- HF config.json <-> ModelConfig

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json", **overrides) -> "ModelConfig":
        """Read the fields of an HF config dict (as `config.json` holds it, or `PretrainedConfig.to_dict()`)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise S2DError(
                f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )

        def need(key):
            if hf.get(key) is None:
                raise S2DError(f"{source}: missing key {key!r}, needed for a {model_type} model")
            return hf[key]

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        if hf.get("mlp_bias"):
            raise S2DError(f"{source}: mlp_bias=true is not supported")
        rope = dict(hf.get("rope_parameters") or {})
        rope.update(hf.get("rope_scaling") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise S2DError(f"{source}: rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        scaling = None
        if rope_type == "linear":
            scaling = ("linear", float(rope["factor"]))
        elif rope_type == "llama3":
            scaling = ("llama3", float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                       int(rope["original_max_position_embeddings"]))
        gemma = model_type == "gemma"
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        activation = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh"}.get(act)
        if activation is None:
            raise S2DError(f"{source}: activation {act!r} is not supported (supported: silu, gelu_pytorch_tanh)")
        window = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            window = None
        if model_type in ("llama", "gemma"):
            window = None
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        fields = dict(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            intermediate_size=need("intermediate_size"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings") or 2048),
            activation=activation,
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=model_type in ("llama", "mistral") and bool(hf.get("attention_bias", False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            norm_plus_one=gemma,
            embed_scale=gemma,
            sliding_window=window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_file(cls, path: str, **overrides) -> "ModelConfig":
        try:
            with open(path) as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise S2DError(f"{os.path.dirname(path) or '.'}: no config.json (expected a Hugging Face model directory or a .gguf file)") from None
        except json.JSONDecodeError as e:
            raise S2DError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_hf(hf, source=path, **overrides)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` fields of this model (transformers' config class for the family fills the rest)."""
        out: dict[str, Any] = dict(
            model_type=self.model_type,
            architectures=[{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                            "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else (self.eos_token_ids or [None])[0],
            torch_dtype=self.param_dtype,
        )
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling and self.rope_scaling[0] == "linear":
            rope.update(rope_type="linear", factor=self.rope_scaling[1])
        elif self.rope_scaling:
            _, factor, low, high, original = self.rope_scaling
            rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                        original_max_position_embeddings=original)
        out["rope_parameters"] = rope
        if self.model_type == "gemma":
            out["hidden_activation"] = "gelu_pytorch_tanh"
        else:
            out["hidden_act"] = "silu"
        if self.model_type in ("llama", "mistral"):
            out["attention_bias"] = self.qkv_bias
        if self.model_type in ("mistral", "qwen2"):
            out["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            out["use_sliding_window"] = self.sliding_window is not None
        return out


PRESETS: dict[str, ModelConfig] = {
    # A few-hundred-thousand-parameter Llama for CPU tests and the tiny pipeline; vocab fits the byte tokenizer.
    "tiny": ModelConfig(model_type="llama", vocab_size=264, hidden_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=1024,
                        tie_embeddings=True, bos_token_id=None, eos_token_ids=(257,)),
    # The CPU demo's toy base model (about 0.46M parameters), pretrained in the run on a synthetic corpus.
    "toy": ModelConfig(model_type="llama", vocab_size=264, hidden_size=128, num_layers=2, num_heads=8,
                       num_kv_heads=8, head_dim=16, intermediate_size=384, max_position_embeddings=512,
                       tie_embeddings=True, bos_token_id=None, eos_token_ids=(257,)),
    # SmolLM2-135M-Instruct's shape (the real weights come from its GGUF or HF directory).
    "smollm2-135m": ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                                num_kv_heads=3, head_dim=64, intermediate_size=1536, rope_theta=100000.0,
                                max_position_embeddings=8192, tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
    "llama3.2-1b": ModelConfig(model_type="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                               num_kv_heads=8, head_dim=64, intermediate_size=8192, rope_theta=500000.0,
                               rope_scaling=("llama3", 32.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
                               tie_embeddings=True, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "llama3-8b": ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                             num_kv_heads=8, head_dim=128, intermediate_size=14336, rope_theta=500000.0,
                             rope_scaling=("llama3", 8.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
                             bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "gemma-2b": ModelConfig(model_type="gemma", vocab_size=256000, hidden_size=2048, num_layers=18, num_heads=8,
                            num_kv_heads=1, head_dim=256, intermediate_size=16384, rms_norm_eps=1e-6,
                            max_position_embeddings=8192, activation="gelu_tanh", tie_embeddings=True,
                            norm_plus_one=True, embed_scale=True, bos_token_id=2, eos_token_ids=(1,)),
}
