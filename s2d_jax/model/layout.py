"""Which HF tensors make each of our parameters, and the conversions both ways (loading and saving read it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from s2d_jax.model.config import ModelConfig

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
                                              lambda w: w.reshape(2, i, d).transpose(0, 2, 1),
                                              lambda w: (w.transpose(0, 2, 1).reshape(2 * i, d),))
        else:
            layer[("attn", "qkv")] = Entry((a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                                           ((h * hd, d), (k * hd, d), (k * hd, d)), qkv_to_ours, qkv_to_hf)
            layer[("mlp", "gate_up")] = Entry(
                (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), ((i, d), (i, d)),
                lambda gate, up: np.stack([gate.T, up.T]), lambda w: (w[0].T, w[1].T))
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
