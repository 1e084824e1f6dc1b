"""ModelConfig: one frozen record of the decoder's shape and family quirks, read from an HF `config.json`.

Family differences are fields, not code paths: Qwen2 is `qkv_bias=True`; Gemma is `norm_plus_one`,
`embed_scale`, `activation='gelu_tanh'` and tied embeddings; Mistral adds `sliding_window`; Llama 3 adds
`rope_scaling`; Qwen3 adds `qk_norm`; Gemma 2 adds `post_norms`, soft-capping, `query_scale` and local/global
`layer_types`; Gemma 3 adds q/k norms and `local_rope_theta`; Phi-3 is a `fused_checkpoint` with LongRoPE and
`partial_rotary_factor`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from s2d_jax.errors import S2DError

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
GEMMA = ("gemma", "gemma2", "gemma3_text")
SLIDING, FULL = "sliding_attention", "full_attention"
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
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings), ("linear", factor),
    # ("longrope", short_factors, long_factors, original_max_position_embeddings, attention_factor)
    rope_scaling: tuple | None = None
    partial_rotary_factor: float = 1.0  # RoPE rotates the first head_dim * factor dimensions (Phi-4-mini)
    local_rope_theta: float | None = None  # Gemma 3: sliding layers use plain RoPE with this base
    max_position_embeddings: int = 2048
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qkv_bias: bool = False
    o_bias: bool = False
    tie_embeddings: bool = False
    norm_plus_one: bool = False  # Gemma's RMSNorm scales by (1 + w)
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    sliding_window: int | None = None
    # per layer SLIDING or FULL; () = every layer alike (sliding when `sliding_window` is set)
    layer_types: tuple[str, ...] = ()
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on queries and keys, before RoPE
    post_norms: bool = False  # Gemma 2/3: norms after attention and MLP too, before each residual add
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    query_scale: float | None = None  # scores scaled by query_scale ** -0.5 (Gemma's query_pre_attn_scalar)
    fused_checkpoint: bool = False  # Phi-3: the checkpoint holds qkv_proj and gate_up_proj fused
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    remat: str = "none"  # training only: none | full | dots (rematerialise each layer in the backward pass)
    scan_layers: bool = False  # parameters stacked [layers, ...] and run under lax.scan (flat compile time)
    attention: str = "auto"  # auto (by backend) | reference | blockwise | cudnn | splash: see attention.py
    splash_block: int = 0  # the splash kernel's tile (0: by length, attention.splash_blocks)
    platform: str = ""  # the platform programs are built for ("" = JAX's backend here; `s2d plan` for a TPU: "tpu")
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
        if self.layer_types and (len(self.layer_types) != self.num_layers or set(self.layer_types) - {SLIDING, FULL}):
            raise S2DError(f"layer_types={self.layer_types!r}: expected {self.num_layers} of {SLIDING!r} / {FULL!r}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise S2DError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(DTYPES)}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s sliding window (None: it attends to the whole context)."""
        if self.layer_types and self.layer_types[layer] == FULL:
            return None
        return self.sliding_window

    @property
    def mixed_layers(self) -> bool:
        """Local and global layers alternate (window, RoPE): scanned layers branch on the layer's kind."""
        return len(set(self.layer_types)) > 1

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        d, h, k, hd, i = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        attn = d * (h + 2 * k) * hd + h * hd * d + (self.qkv_bias and (h + 2 * k) * hd) + (self.o_bias and d)
        layer = attn + 3 * d * i + (4 if self.post_norms else 2) * d + (2 * hd if self.qk_norm else 0)
        return self.vocab_size * d * (1 if self.tie_embeddings else 2) + self.num_layers * layer + d

    # ---------------------------------------------------------------- HF config.json <-> ModelConfig

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json", **overrides) -> "ModelConfig":
        """Read the fields of an HF config dict (as `config.json` holds it, or `PretrainedConfig.to_dict()`)."""
        model_type = hf.get("model_type")
        if model_type == "gemma3" and isinstance(hf.get("text_config"), dict):  # Gemma 3 4B-27B: its text decoder
            hf, model_type = _gemma3_text_config(hf), "gemma3_text"
        if model_type not in SUPPORTED_MODEL_TYPES:
            vision = " (a vision-language checkpoint; only text decoders are supported)" if model_type == "gemma3" else ""
            raise S2DError(f"{source}: model_type {model_type!r} is not supported{vision} "
                           f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")

        def need(key):
            if hf.get(key) is None:
                raise S2DError(f"{source}: missing key {key!r}, needed for a {model_type} model")
            return hf[key]

        hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
        if hf.get("mlp_bias"):
            raise S2DError(f"{source}: mlp_bias=true is not supported")
        if hf.get("use_bidirectional_attention"):
            raise S2DError(f"{source}: use_bidirectional_attention=true (an embedding model) is not supported")
        gemma = model_type in GEMMA
        params = dict(hf.get("rope_parameters") or {})
        local_theta = None
        if FULL in params:  # Gemma 3: RoPE per layer kind
            local_theta = float(params.get(SLIDING, {}).get("rope_theta", 10000.0))
            params = dict(params[FULL])
        elif model_type == "gemma3_text":
            local_theta = float(hf.get("rope_local_base_freq", 10000.0))
        params.update(hf.get("rope_scaling") or {})
        theta = params.get("rope_theta", hf.get("rope_theta", 1e6 if model_type == "gemma3_text" else 10000.0))
        scaling = _rope_scaling(params, hf, source)
        partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        activation = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh"}.get(act)
        if activation is None:
            raise S2DError(f"{source}: activation {act!r} is not supported (supported: silu, gelu_pytorch_tanh)")
        window, types = _layer_types(hf, model_type, layers)
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        bias = bool(hf.get("attention_bias", False))
        fields = dict(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            intermediate_size=need("intermediate_size"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            partial_rotary_factor=partial,
            local_rope_theta=local_theta,
            max_position_embeddings=int(hf.get("max_position_embeddings") or 2048),
            activation=activation,
            qkv_bias=model_type == "qwen2" or bias,
            o_bias=model_type in ("llama", "mistral", "qwen3") and bias,
            tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            norm_plus_one=gemma,
            embed_scale=gemma,
            sliding_window=window,
            layer_types=types,
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            post_norms=model_type in ("gemma2", "gemma3_text"),
            attn_softcap=hf.get("attn_logit_softcapping", 50.0 if model_type == "gemma2" else None),
            final_softcap=hf.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None),
            query_scale=float(hf.get("query_pre_attn_scalar", 256)) if model_type in ("gemma2", "gemma3_text") else None,
            fused_checkpoint=model_type == "phi3",
            bos_token_id=hf.get("bos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
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
            architectures=[ARCHITECTURES[self.model_type]],
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
            pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else (self.eos_token_ids or [None])[0],
            torch_dtype=self.param_dtype,
        )
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        kind = self.rope_scaling[0] if self.rope_scaling else None
        if kind == "linear":
            rope.update(rope_type="linear", factor=self.rope_scaling[1])
        elif kind == "llama3":
            _, factor, low, high, original = self.rope_scaling
            rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                        original_max_position_embeddings=original)
        elif kind == "longrope":
            _, short, long, original, attention = self.rope_scaling
            rope.update(rope_type="longrope", short_factor=list(short), long_factor=list(long),
                        original_max_position_embeddings=original, attention_factor=attention)
            out["original_max_position_embeddings"] = original
        if self.partial_rotary_factor != 1.0:
            rope["partial_rotary_factor"] = self.partial_rotary_factor
        if self.local_rope_theta is not None:
            rope = {FULL: rope, SLIDING: {"rope_theta": self.local_rope_theta, "rope_type": "default"}}
        out["rope_parameters"] = rope
        if self.activation == "gelu_tanh":
            out["hidden_activation" if self.model_type in GEMMA else "hidden_act"] = "gelu_pytorch_tanh"
        else:
            out["hidden_act"] = "silu"
        if self.model_type in ("llama", "mistral", "qwen3"):
            out["attention_bias"] = self.qkv_bias
        if self.model_type not in ("llama", "gemma"):
            out["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = self.sliding_window is not None
            out["max_window_layers"] = 0
        if self.model_type in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
            out["layer_types"] = [self.layer_type(n) for n in range(self.num_layers)]
        if self.model_type in ("gemma2", "gemma3_text"):
            out.update(attn_logit_softcapping=self.attn_softcap, final_logit_softcapping=self.final_softcap,
                       query_pre_attn_scalar=int(self.query_scale) if float(self.query_scale).is_integer()
                       else self.query_scale)
        return out

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else SLIDING if self.sliding_window else FULL


def _gemma3_text_config(hf: dict) -> dict:
    """The text decoder's config of a Gemma 3 vision-language checkpoint, its defaults filled in as transformers
    fills them (hub configs keep only what differs from Gemma3TextConfig's defaults)."""
    from transformers import Gemma3Config

    text = Gemma3Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")}).text_config
    return {**text.to_dict(), "model_type": "gemma3_text"}


def _rope_scaling(rope: dict, hf: dict, source: str) -> tuple | None:
    """`ModelConfig.rope_scaling` from an HF rope dict (old `rope_scaling` or new `rope_parameters` keys)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "su":  # Phi-3's first name for LongRoPE
        kind = "longrope"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise S2DError(f"{source}: rope_type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if kind == "linear":
        return ("linear", float(rope["factor"]))
    if kind == "llama3":
        return ("llama3", float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                int(rope["original_max_position_embeddings"]))
    if kind == "longrope":  # the attention factor as transformers derives it when the config leaves it out
        original = int(rope.get("original_max_position_embeddings") or hf["original_max_position_embeddings"])
        factor = rope.get("factor") or int(hf.get("max_position_embeddings") or original) / original
        attention = rope.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return ("longrope", tuple(map(float, rope["short_factor"])), tuple(map(float, rope["long_factor"])),
                original, float(attention))
    return None


def _layer_types(hf: dict, model_type: str, layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(sliding window, layer types) as transformers builds them per family; () when every layer is alike."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if model_type in ("llama", "gemma"):
        window, types = None, None
    elif model_type in ("qwen2", "qwen3"):
        window = window if hf.get("use_sliding_window", False) else None
        if types is None:
            start = hf.get("max_window_layers", 0) or 0
            types = [SLIDING if window is not None and n >= start else FULL for n in range(layers)]
    elif model_type == "gemma2" and types is None:
        types = [SLIDING if (n + 1) % 2 else FULL for n in range(layers)]
    elif model_type == "gemma3_text" and types is None:
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        types = [SLIDING if (n + 1) % pattern else FULL for n in range(layers)]
    types = tuple(types or ())
    if window is None or set(types) == {FULL}:
        return None, ()
    if set(types) <= {SLIDING}:
        return int(window), ()
    return int(window), types


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
    "qwen3-0.6b": ModelConfig(model_type="qwen3", vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16,
                              num_kv_heads=8, head_dim=128, intermediate_size=3072, rms_norm_eps=1e-6,
                              rope_theta=1e6, max_position_embeddings=40960, tie_embeddings=True, qk_norm=True,
                              eos_token_ids=(151645, 151643)),
    "gemma3-1b": ModelConfig(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, num_layers=26,
                             num_heads=4, num_kv_heads=1, head_dim=256, intermediate_size=6912, rms_norm_eps=1e-6,
                             rope_theta=1e6, local_rope_theta=10000.0, max_position_embeddings=32768,
                             activation="gelu_tanh", tie_embeddings=True, norm_plus_one=True, embed_scale=True,
                             sliding_window=512, layer_types=tuple(SLIDING if (n + 1) % 6 else FULL for n in range(26)),
                             qk_norm=True, post_norms=True, query_scale=256.0, bos_token_id=2, eos_token_ids=(1, 106)),
    "phi3-mini": ModelConfig(model_type="phi3", vocab_size=32064, hidden_size=3072, num_layers=32, num_heads=32,
                             num_kv_heads=32, head_dim=96, intermediate_size=8192, max_position_embeddings=4096,
                             sliding_window=2047, fused_checkpoint=True, bos_token_id=1, eos_token_ids=(32000, 32007)),
    "gemma-2b": ModelConfig(model_type="gemma", vocab_size=256000, hidden_size=2048, num_layers=18, num_heads=8,
                            num_kv_heads=1, head_dim=256, intermediate_size=16384, rms_norm_eps=1e-6,
                            max_position_embeddings=8192, activation="gelu_tanh", tie_embeddings=True,
                            norm_plus_one=True, embed_scale=True, bos_token_id=2, eos_token_ids=(1,)),
}
