"""One config-driven decoder (Llama 2/3, Mistral, Qwen2/3, SmolLM2, Gemma 1/2/3, Phi-3) in Flax NNX.

Layouts are chosen for decode speed and for tensor parallelism at once:
  - q, k and v are one fused projection `qkv: [embed, kv_heads, group + 2, head_dim]`: per kv head, its `group`
    query heads, then its key, then its value. One matmul per layer, and splitting `kv_heads` over the `tensor`
    mesh axis keeps every query head with its own key/value head.
  - gate and up are one parameter `gate_up: [2, embed, mlp]`, two products: each half is a plain `[embed, mlp]`
    matrix (on a TPU a size-2 dimension next to `mlp` took a (2, 128) tiling that XLA re-tiled every decode step).
  - attention runs on `[batch, kv_heads, len, head_dim]`, the KV cache's layout.

Two ways to call it. Without a cache, tokens attend causally within their segment (`segment_ids`, 0 = padding):
the plain forward, training (packed rows) and the sampler's prefill, which also takes back every layer's k/v.
With a cache, new tokens are written at slot `cache.index` and attend to every valid slot before them: decoding.
A sliding-window layer's cache can be a ring of `window` slots (slot s holds position-slot s mod window), so
Gemma's local layers hold no more than their window.
Positions are explicit, so a left-padded prompt sees positions 0..n-1 whatever its padding. Which keys a query
sees is an `attention.Mask` (segments, slots, window), never a `[T, S]` matrix; the attention kernel is chosen by
backend (`attention.py`). With `cfg.scan_layers` the layers' parameters are stacked `[layers, ...]` and run under
`lax.scan` (compile time flat in depth); LoRA adapters (`lora.py`) add to the projections they target.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from s2d_jax.mesh import constrain
from s2d_jax.model import attention as attention_lib, decode_attention
from s2d_jax.model.config import FULL, SLIDING, ModelConfig
from s2d_jax.model.quant import Int8KV, dequantized, kv_store, scaled, weight
from s2d_jax.model.rope import apply_rope, rope_tables


class KVCache(NamedTuple):
    """Preallocated keys/values per layer `[batch, kv_heads, slots, head_dim]` (slots = max_len, or the window
    for a ring layer), which slots hold a token `[batch, max_len]`, and the next slot to write (one index for the
    whole batch: prompts are left-padded to a common length; or one per row `[batch]`, for slots that started at
    different times)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array  # [batch, max_len] bool
    index: jax.Array  # [] or [batch] int32

    @classmethod
    def from_prefill(cls, cfg: ModelConfig, kvs, valid, max_len: int, dtype, constrain=lambda x: x,
                     end=None) -> "KVCache":
        """The cache after a prefill of `P` tokens whose per-layer `(k, v)` are `[B, K, P, hd]` and `valid`
        `[B, P]`: `max_len` slots, or a ring of the window's for a sliding layer whose window is shorter. `end`:
        each row's next slot `[B]` where rows end before `P` (default: every row at `P`)."""
        p = valid.shape[1]
        ks, vs = [], []
        for n, (k, v) in enumerate(kvs):
            size = cache_slots(cfg, n, max_len)
            if size < max_len:  # a ring: each row's last `size` slots before its end, each at its slot mod size
                ends = jnp.full(valid.shape[:1], p, jnp.int32) if end is None else end
                take = jnp.clip(jax.vmap(lambda e: ring_slots(e, size))(ends), 0, p - 1)[:, None, :, None]
                k, v = jnp.take_along_axis(k, take, axis=2), jnp.take_along_axis(v, take, axis=2)
            else:
                k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, max_len - p), (0, 0))) for x in (k, v))
            ks.append(jax.tree.map(constrain, kv_store(k, dtype)))
            vs.append(jax.tree.map(constrain, kv_store(v, dtype)))
        index = jnp.int32(p) if end is None else end.astype(jnp.int32)
        return cls(tuple(ks), tuple(vs), jnp.pad(valid, ((0, 0), (0, max_len - p))), index)


def cache_slots(cfg: ModelConfig, layer: int, max_len: int) -> int:
    window = cfg.window(layer)
    return min(window, max_len) if window else max_len


def ring_slots(end, size: int) -> jax.Array:
    """`[size]`: the position-slot that ring slot r holds once slots `< end` are written (negative: none yet)."""
    r = jnp.arange(size, dtype=jnp.int32)
    return r + size * ((end - 1 - r) // size)


def _param(rngs: nnx.Rngs, shape, axes, dtype, init="normal"):
    if init == "normal":
        value = jax.random.normal(rngs.params(), shape, jnp.float32) * 0.02
    else:
        value = jnp.full(shape, 0.0 if init == "zeros" else 1.0, jnp.float32)
    return nnx.Param(value.astype(dtype), axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dim: int | None = None):
        self.eps, self.plus_one = cfg.rms_norm_eps, cfg.norm_plus_one
        self.weight = _param(rngs, (dim or cfg.hidden_size,), (None,), cfg.param_dtype,
                             "zeros" if self.plus_one else "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        if self.plus_one:  # Gemma: scale in float32, then cast
            return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        return w.astype(x.dtype) * normed.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, k, g, hd = cfg.hidden_size, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
        self.qkv = _param(rngs, (d, k, g + 2, hd), ("embed", "kv_heads", None, None), cfg.param_dtype)
        self.qkv_bias = _param(rngs, (k, g + 2, hd), ("kv_heads", None, None), cfg.param_dtype, "zeros") if cfg.qkv_bias else None
        self.o = _param(rngs, (k, g, hd, d), ("kv_heads", None, None, "embed"), cfg.param_dtype)
        self.o_bias = _param(rngs, (d,), (None,), cfg.param_dtype, "zeros") if cfg.o_bias else None
        self.q_norm = RMSNorm(cfg, rngs=rngs, dim=hd) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg, rngs=rngs, dim=hd) if cfg.qk_norm else None
        # LoRA adapters (lora.add): per HF module, or fused where the checkpoint fuses (Phi-3's qkv_proj)
        self.lora_q = self.lora_k = self.lora_v = self.lora_o = self.lora_qkv = nnx.data(None)

    def __call__(self, x, rope, mask: attention_lib.Mask, window=None, cache_kv=None, index=None, impl="auto",
                 right_padded=False):
        cfg, dt = self.cfg, x.dtype
        g = cfg.group_size
        # in the weights' own layout, heads moved after: else XLA:CPU transposes the weights every decode step
        qkv = scaled(jnp.einsum("btd,dkch->btkch", x, weight(self, "qkv", dt)), self, "qkv")
        qkv = jnp.moveaxis(qkv, 1, 3)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias[...].astype(dt)[None, :, :, None, :]
        if self.lora_qkv is not None:  # [B, T, K, G + 2, hd] -> [B, K, G + 2, T, hd]
            qkv = qkv + jnp.moveaxis(self.lora_qkv(x), 1, 3)
        q, k, v = qkv[:, :, :g], qkv[:, :, g], qkv[:, :, g + 1]
        if self.lora_q is not None:  # [B, T, K, G, hd] -> [B, K, G, T, hd]
            q = q + jnp.moveaxis(self.lora_q(x), 1, 3)
        if self.lora_k is not None:
            k = k + jnp.moveaxis(self.lora_k(x), 1, 2)
        if self.lora_v is not None:
            v = v + jnp.moveaxis(self.lora_v(x), 1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)  # q [B, K, G, T, hd], k/v [B, K, T, hd]
        if cache_kv is None:
            keys, values = k, v
        else:  # write at slot `index` (mod the ring's size), then attend over the whole cache
            ragged = attention_lib.resolve(impl, q.shape[3], q.dtype, right_padded, True, cfg.attn_softcap,
                                           cfg.platform) == "ragged"
            layer = jax.tree.leaves(cache_kv[0])[0]  # (an int8 cache is a pair)
            keys, values = (attention_lib.write_cache(c, kv_store(x, layer.dtype), index % layer.shape[2], ragged,
                                                      cfg.platform) for c, x in zip(cache_kv, (k, v)))
        out = attention_lib.attention(q, keys, values, mask, window=window, impl=impl,
                                      right_padded=right_padded, cached=cache_kv is not None,
                                      scale=cfg.query_scale ** -0.5 if cfg.query_scale else None,
                                      softcap=cfg.attn_softcap, platform=cfg.platform,
                                      splash_block=cfg.splash_block)
        out, w = jnp.moveaxis(out, 3, 1), weight(self, "o", dt)  # [B, T, K, G, hd]; one contraction dim (as above)
        proj = jnp.einsum("btf,fd->btd", out.reshape(out.shape[:2] + (-1,)), w.reshape(-1, w.shape[-1]))
        proj = scaled(proj, self, "o")
        if self.lora_o is not None:
            proj = proj + self.lora_o(out)
        if self.o_bias is not None:
            proj = proj + self.o_bias[...].astype(dt)
        return proj, (keys, values) if cache_kv is not None else (k, v)


# Below this many rows XLA:CPU's batched gate/up product beats two slices of the weight (the slices' copy is not
# amortised): 3.2x at 32 rows, 1.9x at 128, level at 512, 0.8x at 2,048 (SmolLM2-135M's MLP, 2 cores, 2026-12-06)
FEW_ROWS = 512


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.activation, self.platform = cfg.activation, cfg.platform
        # drawn as [embed, 2, mlp] (the layout before 2026-12-05), then stored [2, embed, mlp]: the same initial
        # values, so a toy pretrained from a seed learns as it did
        drawn = _param(rngs, (d, 2, i), (None, None, None), cfg.param_dtype)[...]
        self.gate_up = nnx.Param(jnp.transpose(drawn, (1, 0, 2)), axes=(None, "embed", "mlp"))
        self.down = _param(rngs, (i, d), ("mlp", "embed"), cfg.param_dtype)
        self.lora_gate = self.lora_up = self.lora_down = self.lora_gate_up = nnx.data(None)  # LoRA (lora.add)

    def __call__(self, x):
        w = weight(self, "gate_up", x.dtype)
        b, t, d = x.shape
        cpu = (self.platform or jax.default_backend()) == "cpu"
        if cpu and b * t < FEW_ROWS:
            # a product batched over the weight's leading [2]: XLA:CPU reads each [embed, mlp] half in place, where
            # slicing `w[c]` copies both halves out first, which costs more than a decode step's product
            rows = jnp.broadcast_to(x.reshape(1, b * t, d), (2, b * t, d))
            h = jnp.einsum("cnd,cdi->cni", rows, w).reshape(2, b, t, -1)
            gate, up = (scaled(h[c], self, "gate_up", c) for c in (0, 1))
        elif cpu:  # XLA:CPU multiplies plain [embed, mlp] operands
            gate, up = (scaled(jnp.einsum("btd,di->bti", x, w[c]), self, "gate_up", c) for c in (0, 1))
        else:  # XLA:TPU tiles [2, embed, mlp] as two (embed, mlp) matrices; one product trains ~4% faster
            h = scaled(jnp.einsum("btd,cdi->btci", x, w), self, "gate_up")
            gate, up = h[:, :, 0], h[:, :, 1]
        if self.lora_gate_up is not None:
            h = self.lora_gate_up(x)  # [B, T, 2, mlp]
            gate, up = gate + h[:, :, 0], up + h[:, :, 1]
        if self.lora_gate is not None:
            gate = gate + self.lora_gate(x)
        if self.lora_up is not None:
            up = up + self.lora_up(x)
        act = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        out = scaled(jnp.einsum("bti,id->btd", act * up, weight(self, "down", x.dtype)), self, "down")
        if self.lora_down is not None:
            out = out + self.lora_down(act * up)
        return out


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg, rngs=rngs) if cfg.post_norms else None
        self.post_mlp_norm = RMSNorm(cfg, rngs=rngs) if cfg.post_norms else None

    def __call__(self, x, rope, mask, **kwargs):
        h, kv = self.attn(self.attn_norm(x), rope, mask, **kwargs)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = constrain(x + h, ("batch", None, None))
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return constrain(x + h, ("batch", None, None)), kv


def stack_layers(blocks: list[Block]) -> Block:
    """One Block whose parameters are `blocks`' stacked on a leading `layers` axis (replicated on the mesh)."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.state(b) for b in blocks]

    def stack(*vs):
        axes = vs[0].get_metadata().get("axes") or (None,) * vs[0][...].ndim
        return vs[0].replace(jnp.stack([v[...] for v in vs]), axes=("layers",) + tuple(axes))

    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


class Transformer(nnx.Module):
    """`model(tokens) -> float32 logits [B, T, vocab]`; `forward` and `logits` are the parts the sampler uses."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype)
        blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
        self.layers = stack_layers(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.final_norm = RMSNorm(cfg, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else _param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        hidden, _ = self.forward(tokens, positions, segment_ids=segment_ids)
        return self.logits(hidden)

    def forward(self, tokens, positions=None, *, segment_ids=None, cache: KVCache | None = None,
                right_padded: bool = False):
        """Final hidden states `[B, T, embed]` and either every layer's new (k, v) (no cache) or the updated cache.
        `right_padded`: the caller promises one segment per row, padding only at its end (lets cuDNN run it)."""
        cfg = self.cfg
        x, ropes = self._embed(tokens, positions)
        t = tokens.shape[1]
        if cache is None:  # causal, within the same segment, never onto padding (segment 0)
            mask, kw = self._causal(tokens, segment_ids, right_padded)
        else:  # the new tokens' slots become valid first (padding, segment 0, never does): each token sees itself
            # and every valid slot before it
            new = jnp.ones(tokens.shape, bool) if segment_ids is None else segment_ids != 0
            valid = decode_attention.write_slots(cache.valid, new, cache.index, 1, select=True)
            mask, masks = None, _cache_masks(cache, valid, t)  # one per cache length (full, or a ring)
            kw = dict(impl=cfg.attention)

        def call(layer, h, kind, **extra):
            window = cfg.sliding_window if kind == SLIDING else None
            return layer(h, ropes[kind], extra.pop("mask", mask), window=window, **kw, **extra)

        policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots" else None
        if cfg.scan_layers and cache is None:
            graphdef, state = nnx.split(self.layers)
            run = {kind: (lambda st, h, kind=kind: call(nnx.merge(graphdef, st), h, kind)) for kind in (FULL, SLIDING)}

            def body(h, xs):
                layer_state, sliding = xs
                if cfg.mixed_layers:  # local and global layers alternate: branch on the layer's kind
                    return jax.lax.cond(sliding, run[SLIDING], run[FULL], layer_state, h)
                return run[cfg.layer_type(0)](layer_state, h)

            if cfg.remat != "none":
                body = jax.checkpoint(body, policy=policy)
            sliding = jnp.asarray([cfg.layer_type(n) == SLIDING for n in range(cfg.num_layers)])
            x, (ks, vs) = jax.lax.scan(body, x, (state, sliding))
            kvs = [(ks[i], vs[i]) for i in range(cfg.num_layers)]
        else:
            kvs = []
            for i, layer in enumerate(self._layer_list()):
                kind = cfg.layer_type(i)
                if cache is None and cfg.remat != "none":  # training: keep only what the policy saves
                    x, kv = nnx.remat(lambda block, h: call(block, h, kind), policy=policy)(layer, x)
                elif cache is None:
                    x, kv = call(layer, x, kind)
                else:
                    x, kv = call(layer, x, kind, mask=masks[cache.k[i].shape[2]], cache_kv=(cache.k[i], cache.v[i]),
                                 index=cache.index)
                kvs.append(kv)
        hidden = self.final_norm(x)
        if cache is None:
            return hidden, kvs
        same = lambda x, c: x if isinstance(x, Int8KV) else x.astype(c.dtype)
        return hidden, KVCache(tuple(same(kv[0], cache.k[0]) for kv in kvs),
                               tuple(same(kv[1], cache.v[0]) for kv in kvs), valid, cache.index + t)

    def residuals(self, tokens, segment_ids=None) -> jax.Array:
        """The residual stream after the embedding and after each layer, `[num_layers + 1, B, T, embed]` (the last
        one through the final norm, as `forward` returns it): what a probe on the model's own states reads."""
        x, ropes = self._embed(tokens, None)
        mask, kw = self._causal(tokens, segment_ids, False)
        out = [x]
        for i, layer in enumerate(self._layer_list()):
            kind = self.cfg.layer_type(i)
            x, _ = layer(x, ropes[kind], mask, window=self.cfg.sliding_window if kind == SLIDING else None, **kw)
            out.append(x)
        out[-1] = self.final_norm(x)
        return jnp.stack(out)

    def _embed(self, tokens, positions):
        """The token embeddings (scaled where the family does) and the rotary tables of both layer kinds."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        ropes = {FULL: rope_tables(positions, cfg, dt)}
        ropes[SLIDING] = rope_tables(positions, cfg, dt, local=True) if cfg.local_rope_theta else ropes[FULL]
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
        if cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dt)
        return constrain(x, ("batch", None, None)), ropes

    def _causal(self, tokens, segment_ids, right_padded: bool):
        """Without a cache: the causal mask within each segment, never onto padding (segment 0), and the kernel's
        keywords."""
        b, t = tokens.shape
        seg = jnp.ones(tokens.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        slots = jnp.arange(t, dtype=jnp.int32)
        mask = attention_lib.Mask(seg, seg, jnp.broadcast_to(slots, (b, t)), slots)
        return mask, dict(impl=self.cfg.attention, right_padded=right_padded or segment_ids is None)

    def _layer_list(self) -> list[Block]:
        """The blocks one by one (for scanned layers: each a static slice of the stack, for decoding)."""
        if not self.cfg.scan_layers:
            return list(self.layers)
        graphdef, state = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda p, n=n: p[n], state)) for n in range(self.cfg.num_layers)]

    def head(self, dtype=None) -> jax.Array:
        """The output projection `[vocab, embed]` (the embedding when tied), in `dtype` (default: its own)."""
        name = "embed" if self.lm_head is None else "lm_head"
        return dequantized(self, name, dtype or getattr(self, name)[...].dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        name = "embed" if self.lm_head is None else "lm_head"
        out = jnp.einsum("...d,vd->...v", hidden, weight(self, name, hidden.dtype))
        out = scaled(out, self, name).astype(jnp.float32)
        if self.cfg.final_softcap:
            out = self.cfg.final_softcap * jnp.tanh(out / self.cfg.final_softcap)
        return out


def _cache_masks(cache: KVCache, valid: jax.Array, t: int) -> dict[int, attention_lib.Mask]:
    """Cache length -> the mask of `t` new tokens over a cache of that many slots (a ring when shorter)."""
    b, max_len = valid.shape
    q_seg = jnp.ones((b, t), jnp.int32)
    first = cache.index[:, None] if cache.index.ndim else cache.index
    q_slots = jnp.broadcast_to(first + jnp.arange(t, dtype=jnp.int32), (b, t))
    masks = {}
    for size in {k.shape[2] for k in cache.k}:
        if size == max_len:
            masks[size] = attention_lib.Mask(q_seg, valid.astype(jnp.int32), q_slots, jnp.arange(size, dtype=jnp.int32))
            continue
        if t > 1:
            raise ValueError(f"a ring cache of {size} slots takes one token per step, got {t}")
        if cache.index.ndim:  # each row its own ring position: [B, size]
            held = jax.vmap(lambda end: ring_slots(end, size))(cache.index + t)
            seg = jnp.where(held >= 0, jnp.take_along_axis(valid, jnp.clip(held, 0), axis=1), False)
        else:
            held = ring_slots(cache.index + t, size)
            seg = jnp.where(held >= 0, jnp.take(valid, jnp.clip(held, 0), axis=1), False)
        masks[size] = attention_lib.Mask(q_seg, seg.astype(jnp.int32), q_slots, held)
    return masks


