"""Checkpoints in and out: HF safetensors directories and GGUF files in, HF safetensors out.

One table (`hf_layout`) says, for every parameter of ours, which HF tensors it is made of and how to convert
each way; loading and saving both read it. Weights are read only through safetensors or GGUF, never unpickled.
With a mesh, one parameter at a time is read on host and each device receives only its own shard.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from s2d_jax import distributed, mesh as mesh_lib
from s2d_jax.artifacts import atomic_dir
from s2d_jax.errors import S2DError
from s2d_jax.model.config import ModelConfig
from s2d_jax.model.transformer import Transformer

# Buffers some HF checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Entry:
    names: tuple[str, ...]  # HF tensor names
    hf_shapes: tuple[tuple[int, ...], ...]
    to_ours: Callable[..., np.ndarray]
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def hf_layout(cfg: ModelConfig) -> dict[tuple, Entry]:
    """Our parameter path -> the HF tensors it is made of, and the conversions both ways."""
    d, h, k, g, hd, i = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.group_size, cfg.head_dim,
                         cfg.intermediate_size)
    same = (lambda w: w, lambda w: (w,))

    def qkv_to_ours(q, kk, v):  # HF [out, in] -> [in, kv_heads, group + 2, head_dim]
        return np.concatenate([q.T.reshape(d, k, g, hd), kk.T.reshape(d, k, 1, hd), v.T.reshape(d, k, 1, hd)], 2)

    def qkv_to_hf(w):
        return w[:, :, :g].reshape(d, h * hd).T, w[:, :, g].reshape(d, k * hd).T, w[:, :, g + 1].reshape(d, k * hd).T

    def qkv_bias_to_ours(q, kk, v):
        return np.concatenate([q.reshape(k, g, hd), kk.reshape(k, 1, hd), v.reshape(k, 1, hd)], 1)

    def qkv_bias_to_hf(w):
        return w[:, :g].reshape(-1), w[:, g].reshape(-1), w[:, g + 1].reshape(-1)

    layout = {("embed",): Entry(("model.embed_tokens.weight",), ((cfg.vocab_size, d),), *same),
              ("final_norm", "weight"): Entry(("model.norm.weight",), ((d,),), *same)}
    if not cfg.tie_embeddings:
        layout[("lm_head",)] = Entry(("lm_head.weight",), ((cfg.vocab_size, d),), *same)
    for n in range(cfg.num_layers):
        p, a = f"model.layers.{n}.", f"model.layers.{n}.self_attn."
        layer = {
            ("attn_norm", "weight"): Entry((p + "input_layernorm.weight",), ((d,),), *same),
            ("attn", "o"): Entry((a + "o_proj.weight",), ((d, h * hd),),
                                 lambda w: w.T.reshape(k, g, hd, d), lambda w: (w.reshape(h * hd, d).T,)),
            ("mlp", "down"): Entry((p + "mlp.down_proj.weight",), ((d, i),), lambda w: w.T, lambda w: (w.T,)),
        }
        if cfg.fused_checkpoint:  # Phi-3: [q; k; v] rows in one qkv_proj, [gate; up] rows in one gate_up_proj
            layer[("attn", "qkv")] = Entry(
                (a + "qkv_proj.weight",), (((h + 2 * k) * hd, d),),
                lambda w: qkv_to_ours(*np.split(w, [h * hd, (h + k) * hd])), lambda w: (np.concatenate(qkv_to_hf(w)),))
            layer[("mlp", "gate_up")] = Entry((p + "mlp.gate_up_proj.weight",), ((2 * i, d),),
                                              lambda w: w.T.reshape(d, 2, i), lambda w: (w.reshape(d, 2 * i).T,))
        else:
            layer[("attn", "qkv")] = Entry((a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                                           ((h * hd, d), (k * hd, d), (k * hd, d)), qkv_to_ours, qkv_to_hf)
            layer[("mlp", "gate_up")] = Entry(
                (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), ((i, d), (i, d)),
                lambda gate, up: np.stack([gate.T, up.T], 1), lambda w: (w[:, 0].T, w[:, 1].T))
        # the norm before the MLP: Llama's post_attention_layernorm; Gemma 2/3 name their extra norms after it
        norms = {("mlp_norm", "weight"): "post_attention_layernorm"}
        if cfg.post_norms:
            norms = {("post_attn_norm", "weight"): "post_attention_layernorm",
                     ("mlp_norm", "weight"): "pre_feedforward_layernorm",
                     ("post_mlp_norm", "weight"): "post_feedforward_layernorm"}
        layer.update({key: Entry((p + name + ".weight",), ((d,),), *same) for key, name in norms.items()})
        if cfg.qk_norm:
            layer[("attn", "q_norm", "weight")] = Entry((a + "q_norm.weight",), ((hd,),), *same)
            layer[("attn", "k_norm", "weight")] = Entry((a + "k_norm.weight",), ((hd,),), *same)
        if cfg.qkv_bias:
            layer[("attn", "qkv_bias")] = Entry((a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
                                                ((h * hd,), (k * hd,), (k * hd,)), qkv_bias_to_ours, qkv_bias_to_hf)
        if cfg.o_bias:
            layer[("attn", "o_bias")] = Entry((a + "o_proj.bias",), ((d,),), *same)
        layout.update({("layers", n) + key: entry for key, entry in layer.items()})
    return layout


# ------------------------------------------------------------------------------------------ tensor sources


class SafetensorsSource:
    """An HF directory: `config.json` plus one `model.safetensors` or shards listed in their index."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path, self.where = path, {}
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
                self.where[name] = f

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._handles[self.where[name]].get_tensor(name)

    def describe(self, name: str) -> str:
        return self.where[name]


class GGUFSource:
    """A GGUF file (llama.cpp), dequantised tensor by tensor through the `gguf` package.

    We read it with `gguf` rather than transformers' GGUF loader because that one imports torch, which is kept
    out of the core install. llama.cpp permutes the rows of q and k for its RoPE layout in `llama` files; we undo
    that. Gemma files store RMSNorm weights with the +1 already added; we take it off again.
    """

    ARCHES = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma"}

    def __init__(self, path: str):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:
            raise S2DError(f"{path}: not a readable GGUF file ({e})") from None
        fields = self.reader.fields
        self.meta = {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.ggml.")}
        arch = self.meta.get("general.architecture")
        if arch not in self.ARCHES:
            raise S2DError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(self.ARCHES)})")
        self.arch = arch
        tensors = {t.name: t for t in self.reader.tensors}
        if "rope_freqs.weight" in tensors:
            raise S2DError(f"{path}: GGUF rope_freqs (Llama 3 rope scaling) is not supported; convert from the HF checkpoint")
        name_map = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.upper()], int(self.meta[f"{arch}.block_count"]))
        self._tensors = tensors
        self._hf_names = {}
        model_type = "mistral" if arch == "llama" and "mistral" in str(self.meta.get("general.name", "")).lower() else arch
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
        return dict(
            model_type=model_type,
            vocab_size=int(self._tensors["token_embd.weight"].shape[-1]),
            hidden_size=hidden,
            num_hidden_layers=int(m[f"{a}.block_count"]),
            num_attention_heads=heads,
            num_key_value_heads=int(m.get(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(m.get(f"{a}.attention.key_length", m.get(f"{a}.rope.dimension_count", hidden // heads))),
            intermediate_size=int(m[f"{a}.feed_forward_length"]),
            rms_norm_eps=float(m[f"{a}.attention.layer_norm_rms_epsilon"]),
            rope_theta=float(m.get(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(m.get(f"{a}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in self._tensors,
            bos_token_id=tok.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=tok.get("tokenizer.ggml.eos_token_id"),
            hidden_activation="gelu_pytorch_tanh" if a == "gemma" else None,
        )

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
        if self.arch == "gemma" and name.endswith("norm.weight"):
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


def read_config(path: str) -> ModelConfig:
    return open_checkpoint(path).config


# ------------------------------------------------------------------------------------------ load / save


def _stacked(cfg: ModelConfig, key: tuple) -> bool:
    return cfg.scan_layers and key[0] == "layers"


def _per_layer(cfg: ModelConfig, key: tuple) -> list[tuple]:
    """The `hf_layout` keys that our parameter `key` holds: itself, or with scanned layers one per layer."""
    if _stacked(cfg, key):
        return [("layers", n) + key[1:] for n in range(cfg.num_layers)]
    return [key]


def load_model(path: str, dtype: str = "float32", mesh=None, compute_dtype: str | None = None,
               scan_layers: bool = False) -> Transformer:
    """The model at `path` with parameters in `dtype`, placed on `mesh` by the logical-axis rules if given;
    `scan_layers` stacks the layers' parameters for `lax.scan`."""
    path = os.fspath(path)
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
    if os.path.exists(out_dir) and not overwrite:
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
