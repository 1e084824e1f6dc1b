"""Tensor sources: an HF safetensors directory or a GGUF file, read tensor by tensor in HF names and layouts.

Weights are read only through safetensors or GGUF, never unpickled.
"""

from __future__ import annotations

import functools
import glob
import os

import numpy as np

from s2d_jax.errors import S2DError
from s2d_jax.model.config import ModelConfig
from s2d_jax.model.layout import hf_layout

# A vision-language checkpoint's text decoder (Gemma 3 4B-27B): its tensors under these prefixes, in the layout
# hub checkpoints use and in transformers' own; the vision tower and projector are not read.
TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head."))
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def text_name(name: str) -> str | None:
    """The text decoder's HF name for a stored tensor name (None for a vision tensor)."""
    if name.startswith(VISION_PREFIXES):
        return None
    for prefix, plain in TEXT_PREFIXES:
        if name.startswith(prefix):
            return plain + name[len(prefix):]
    return name


class SafetensorsSource:
    """An HF directory: `config.json` plus one `model.safetensors` or shards listed in their index. A Gemma 3
    vision-language checkpoint is read as its text decoder (`gemma3_text`)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path, self.where, self.stored = path, {}, {}
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            pickles = [os.path.basename(f) for f in glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))]
            found = f"only pickle weights ({', '.join(sorted(pickles))})" if pickles else "no *.safetensors files"
            raise S2DError(f"{path}: {found}; s2d_jax reads only safetensors and GGUF weights and never unpickles")
        self.config = ModelConfig.from_file(os.path.join(path, "config.json"))
        self._handles = {}
        for f in files:
            try:
                handle = safe_open(f, framework="numpy")
            except Exception as e:  # safetensors raises its own error types for a torn or foreign file
                raise S2DError(f"{f}: not a readable safetensors file ({e})") from None
            self._handles[f] = handle
            for name in handle.keys():
                if (text := text_name(name)) is not None:
                    self.where[text], self.stored[text] = f, name

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[name]].get_slice(self.stored[name]).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._handles[self.where[name]].get_tensor(self.stored[name])

    def describe(self, name: str) -> str:
        return self.where[name]


class GGUFSource:
    """A GGUF file (llama.cpp), dequantised tensor by tensor through the `gguf` package.

    We read it with `gguf` rather than transformers' GGUF loader because that one imports torch, which is kept
    out of the core install. llama.cpp permutes the rows of q and k for its RoPE layout in `llama` files; we undo
    that. Gemma files store RMSNorm weights with the +1 already added; we take it off again. What llama.cpp
    hard-codes per architecture rather than storing (Gemma's layer patterns, Gemma 3's local RoPE base, the
    attention scale of the 27B Gemmas) is filled in as llama.cpp does.
    """

    # GGUF architecture -> HF model_type
    ARCHES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
              "gemma3": "gemma3_text", "phi3": "phi3"}
    GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp scales their queries by hidden / heads

    def __init__(self, path: str):
        import gguf

        self.path = path
        self.reader = gguf_reader(path)
        fields = self.reader.fields
        self.meta = {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.ggml.")}
        arch = self.meta.get("general.architecture")
        if arch not in self.ARCHES:
            raise S2DError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(self.ARCHES)})")
        self.arch = arch
        tensors = {t.name: t for t in self.reader.tensors}
        name_map = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.upper()], int(self.meta[f"{arch}.block_count"]))
        self._tensors = tensors
        self._hf_names = {}
        model_type = self.ARCHES[arch]
        if arch == "llama" and "mistral" in str(self.meta.get("general.name", "")).lower():
            model_type = "mistral"
        self.config = ModelConfig.from_hf(self._hf_config(model_type), source=path)
        for entry in hf_layout(self.config).values():
            for hf_name in entry.names:
                gg = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gg in tensors:
                    self._hf_names[hf_name] = gg

    def _hf_config(self, model_type: str) -> dict:
        m, a = self.meta, self.arch
        tok = {k: self.reader.fields[k].contents() for k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
               if k in self.reader.fields}
        heads = int(m[f"{a}.attention.head_count"])
        hidden = int(m[f"{a}.embedding_length"])
        rotary = m.get(f"{a}.rope.dimension_count") if a != "phi3" else None  # Phi-3's may be a partial rotary
        head_dim = int(m.get(f"{a}.attention.key_length", rotary or hidden // heads))
        theta = float(m.get(f"{a}.rope.freq_base", 10000.0))
        rope = self._rope_freqs(theta, head_dim) if "rope_freqs.weight" in self._tensors else None
        return dict(
            rope_parameters=rope,
            model_type=model_type,
            vocab_size=int(self._tensors["token_embd.weight"].shape[-1]),
            hidden_size=hidden,
            num_hidden_layers=int(m[f"{a}.block_count"]),
            num_attention_heads=heads,
            num_key_value_heads=int(m.get(f"{a}.attention.head_count_kv", heads)),
            head_dim=head_dim,
            intermediate_size=int(m[f"{a}.feed_forward_length"]),
            rms_norm_eps=float(m[f"{a}.attention.layer_norm_rms_epsilon"]),
            rope_theta=theta,
            max_position_embeddings=int(m.get(f"{a}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in self._tensors,
            bos_token_id=tok.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=tok.get("tokenizer.ggml.eos_token_id"),
            hidden_activation="gelu_pytorch_tanh" if a.startswith("gemma") else None,
        ) | self._family_config(head_dim, hidden, heads)

    def _family_config(self, head_dim: int, hidden: int, heads: int) -> dict:
        """The HF config keys of the newer families, from their GGUF keys and llama.cpp's per-arch constants."""
        m, a = self.meta, self.arch
        layers = int(m[f"{a}.block_count"])
        out = {}
        if f"{a}.attention.sliding_window" in m:
            out["sliding_window"] = int(m[f"{a}.attention.sliding_window"])
        if a in ("gemma2", "gemma3"):
            scale = m.get(f"{a}.attention.scale")
            out["query_pre_attn_scalar"] = (scale ** -2 if scale else hidden // heads
                                            if layers == self.GEMMA_27B_LAYERS[a] else head_dim)
            pattern = m.get(f"{a}.attention.sliding_window_pattern", 2 if a == "gemma2" else 6)
            local = ([bool(x) for x in pattern] if isinstance(pattern, list) else
                     [bool((n + 1) % int(pattern)) for n in range(layers)])
            out["layer_types"] = ["sliding_attention" if x else "full_attention" for x in local]
        if a == "gemma2":
            out["attn_logit_softcapping"] = m.get("gemma2.attn_logit_softcapping")
            out["final_logit_softcapping"] = m.get("gemma2.final_logit_softcapping")
        if a == "gemma3":
            full = {"rope_type": "default", "rope_theta": float(m.get("gemma3.rope.freq_base", 1e6))}
            if m.get("gemma3.rope.scaling.type") == "linear":
                full.update(rope_type="linear", factor=float(m["gemma3.rope.scaling.factor"]))
            local_theta = float(m.get("gemma3.rope.freq_base_swa", 10000.0))
            out["rope_parameters"] = {"full_attention": full,
                                      "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}
        if a == "phi3":
            rotary = int(m.get("phi3.rope.dimension_count", head_dim))
            rope = {"rope_type": "default", "partial_rotary_factor": rotary / head_dim}
            if "rope_factors_long.weight" in self._tensors:
                original = int(m["phi3.rope.scaling.original_context_length"])
                factors = {k: [float(x) for x in np.asarray(self._tensors[f"rope_factors_{k}.weight"].data).reshape(-1)]
                           for k in ("short", "long")}
                rope.update(rope_type="longrope", short_factor=factors["short"], long_factor=factors["long"],
                            original_max_position_embeddings=original,
                            attention_factor=m.get("phi3.rope.scaling.attn_factor"))
                out["original_max_position_embeddings"] = original
            out["rope_scaling"] = rope
            out["hidden_act"] = "silu"
        return out

    def _rope_freqs(self, theta: float, dim: int) -> dict:
        """The Llama 3 rope scaling that llama.cpp's `rope_freqs` tensor (a divisor per frequency) encodes.

        The divisors are `factor` for long wavelengths, 1 for short ones and a smooth ramp between, which pins
        `factor` and the ramp's line (`original / (high - low)`, `low / (high - low)`); any triple on that line
        gives the same frequencies, so `high - low = 3` (Llama 3's 1 and 4) is taken. The result is checked
        against the tensor."""
        from s2d_jax.model.rope import inverse_frequencies

        t = self._tensors["rope_freqs.weight"]
        divisors = np.asarray(t.data, np.float64).reshape(-1)
        inv = inverse_frequencies(dim, theta)
        factor = float(divisors.max())
        if divisors.shape != inv.shape or factor < 1.0:
            raise S2DError(f"{self.path}: rope_freqs has {divisors.size} values (>= 1 each), expected {inv.size}")
        ramp = (1 / divisors - 1 / factor) / (1 - 1 / factor) if factor > 1 else np.zeros_like(divisors)
        medium = (ramp > 1e-4) & (ramp < 1 - 1e-4)
        low = 1.0
        if medium.sum() >= 2:
            slope, intercept = np.polyfit(inv[medium], ramp[medium], 1)
            low, original = -3 * intercept, slope * 2 * np.pi * 3
        elif medium.sum() == 1:
            original = 2 * np.pi / inv[medium][0] * (3 * ramp[medium][0] + low)
        else:
            original = int(self.meta.get(f"{self.arch}.rope.scaling.original_context_length", 8192))
        params = dict(rope_type="llama3", factor=factor, low_freq_factor=round(float(low), 6),
                      high_freq_factor=round(float(low) + 3, 6), original_max_position_embeddings=int(round(original)),
                      rope_theta=theta)
        scaling = ("llama3", factor, params["low_freq_factor"], params["high_freq_factor"],
                   params["original_max_position_embeddings"])
        if not np.allclose(inverse_frequencies(dim, theta, scaling), inv / divisors, rtol=1e-4, atol=0):
            raise S2DError(f"{self.path}: rope_freqs is not a Llama 3 rope scaling (nearest: {params}); "
                           f"convert from the HF checkpoint")
        return params

    def names(self) -> set[str]:
        return set(self._hf_names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in reversed(self._tensors[self._hf_names[name]].shape))

    def get(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors[self._hf_names[name]]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(self.shape(name)).astype(np.float32)
        cfg = self.config
        if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_heads if name.endswith("q_proj.weight") else cfg.num_kv_heads
            out, inp = w.shape
            w = w.reshape(heads, out // heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)
        if self.arch.startswith("gemma") and name.endswith("norm.weight"):
            w = w - 1.0
        return w

    def describe(self, name: str) -> str:
        return f"{self.path} ({self._hf_names[name]})"


def open_checkpoint(path: str):
    """The tensor source for `path` (an HF directory or a `.gguf` file)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise S2DError(f"{path}: no such file or directory (expected a Hugging Face model directory or a .gguf file)")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise S2DError(f"{path}: no config.json (expected a Hugging Face model directory or a .gguf file)")
        return SafetensorsSource(path)
    if path.endswith(".gguf"):
        return GGUFSource(path)
    raise S2DError(f"{path}: not a model (expected a Hugging Face model directory or a .gguf file)")


def gguf_reader(path: str):
    """`gguf.GGUFReader(path)`, shared per file version within a process: parsing a header takes seconds (2.2 s for
    SmolLM2-135M's, its 49,152-token vocabulary one field part at a time), and a run opens its GGUF for the
    tokenizer, the config and the weights. The reader maps the file read-only; its arrays are views of that map."""
    try:
        stat = os.stat(path)
        return _gguf_reader(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    except Exception as e:
        raise S2DError(f"{path}: not a readable GGUF file ({e})") from None


@functools.lru_cache(maxsize=4)
def _gguf_reader(path: str, mtime_ns: int, size: int):
    import gguf

    return gguf.GGUFReader(path)


def read_config(path: str) -> ModelConfig:
    """The model config at `path` (cached per file version: a GGUF header takes seconds to parse)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return open_checkpoint(path).config  # the one clear error
    target = os.path.join(path, "config.json") if os.path.isdir(path) else path
    stat = os.stat(target) if os.path.exists(target) else os.stat(path)
    return _read_config(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read_config(path: str, mtime_ns: int, size: int) -> ModelConfig:
    if os.path.isdir(path):  # config.json alone: shapes need no weights (a plan fetches nothing else)
        return ModelConfig.from_file(os.path.join(path, "config.json"))
    return open_checkpoint(path).config
