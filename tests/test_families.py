"""Every family against transformers on padded batches; the newer families (Qwen3, Gemma 2, Gemma 3, Phi-3)
sharded, scanned and with windowed caches; GGUF files as llama.cpp writes them, Llama 3's `rope_freqs` included."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import s2d_jax
from s2d_jax.model import KVCache, load_model
from conftest import FAMILIES, TINY, assert_sharded_forward_equals_one_device, make_hf_model, torch_logits

NEW = ["qwen3", "gemma2", "gemma3", "phi3"]
LENGTHS = (5, 17, 70)  # 70 is past phi3's original context (64): that row takes LongRoPE's long factors
IDS = np.random.RandomState(5).randint(0, 264, (2, 13))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_batch_matches_transformers_row_by_row(hf_models, family, side):
    path, ref = hf_models[family]
    rng = np.random.RandomState(0)
    rows = [rng.randint(3, 264, n) for n in LENGTHS]
    width = max(LENGTHS)
    tokens, positions, segments = (np.zeros((len(rows), width), np.int32) for _ in range(3))
    spans = [slice(width - len(r), width) if side == "left" else slice(0, len(r)) for r in rows]
    for n, (row, span) in enumerate(zip(rows, spans)):
        tokens[n, span], positions[n, span], segments[n, span] = row, np.arange(len(row)), 1
    out = np.asarray(load_model(path)(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))
    for n, (row, span) in enumerate(zip(rows, spans)):
        np.testing.assert_allclose(out[n, span], torch_logits(ref, row[None])[0], atol=1e-4)


def test_new_families_are_config_fields(hf_models):
    cfg = {f: load_model(hf_models[f][0]).cfg for f in NEW}
    assert cfg["qwen3"].qk_norm and not cfg["qwen3"].norm_plus_one and cfg["qwen3"].head_dim == 20
    assert cfg["qwen3"].layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    assert cfg["gemma2"].post_norms and cfg["gemma2"].attn_softcap == 4.0 and cfg["gemma2"].final_softcap == 8.0
    assert cfg["gemma2"].query_scale == 20 and cfg["gemma2"].window(0) == 5 and cfg["gemma2"].window(1) is None
    assert cfg["gemma3"].qk_norm and cfg["gemma3"].local_rope_theta == 10000.0 and cfg["gemma3"].rope_scaling == (
        "linear", 4.0)
    assert cfg["phi3"].fused_checkpoint and cfg["phi3"].rotary_dim == 12 and cfg["phi3"].rope_scaling[0] == "longrope"


@pytest.mark.parametrize("family", NEW)
def test_sharded_forward_equals_one_device(hf_models, family):
    path, _ = hf_models[family]
    mesh = s2d_jax.make_mesh(data=2, fsdp=2, tensor=2)
    assert_sharded_forward_equals_one_device(load_model(path), load_model(path, mesh=mesh), mesh, vocab=264, seed=1)


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3"])  # local and global layers alternate
def test_scanned_alternating_layers_match_transformers_and_unrolled_gradients(hf_models, family):
    path, ref = hf_models[family]
    scanned, unrolled = load_model(path, scan_layers=True), load_model(path)
    assert scanned.cfg.mixed_layers
    np.testing.assert_allclose(scanned(IDS), torch_logits(ref, IDS), atol=1e-4)
    loss = lambda model: jnp.mean(jnp.square(model(IDS)))
    grads = [nnx.grad(loss)(m) for m in (scanned, unrolled)]
    for key in ("embed",):
        np.testing.assert_allclose(grads[0][key][...], grads[1][key][...], atol=1e-5)
    np.testing.assert_allclose(grads[0]["layers"]["attn"]["qkv"][...][1], grads[1]["layers"][1]["attn"]["qkv"][...],
                               atol=1e-5)


def test_sliding_layers_cache_only_their_window(hf_models):
    path, _ = hf_models["gemma3"]  # window 4; layers sliding, full, sliding
    model = load_model(path)
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 264, (2, 14)), jnp.int32)
    full = model(ids)
    prefix, max_len = 6, 16
    hidden, kvs = model.forward(ids[:, :prefix])
    cache = KVCache.from_prefill(model.cfg, kvs, jnp.ones((2, prefix), bool), max_len, jnp.float32)
    assert [k.shape[2] for k in cache.k] == [4, max_len, 4]
    steps = [model.logits(hidden[:, -1])]
    for t in range(prefix, 14):
        hidden, cache = model.forward(ids[:, t:t + 1], jnp.full((2, 1), t), cache=cache)
        steps.append(model.logits(hidden[:, -1]))
    np.testing.assert_allclose(jnp.stack(steps[:-1], 1), full[:, prefix - 1:13], atol=1e-5)


# ------------------------------------------------------------------------------------------ GGUF


def _llama3_rope_freqs(rope: dict, dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` for a Llama 3 rope scaling (convert_hf_to_gguf.py, LlamaModel)."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _write_gguf(torch_model, path, arch: str):
    """A float32 GGUF of `torch_model` with llama.cpp's conventions: its tensor names, q/k rows permuted for
    `llama`, Gemma norms stored +1, Llama 3's rope scaling as `rope_freqs`, Phi-3's LongRoPE as factor tensors."""
    import gguf

    cfg = torch_model.config
    layers, heads, kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    if arch != "phi3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "gemma3" and rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    extra = {}
    if arch == "llama" and rope.get("rope_type") == "llama3":
        extra["rope_freqs.weight"] = _llama3_rope_freqs(rope, head_dim)
    if arch == "phi3":
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        if rope.get("rope_type") == "longrope":
            original = rope["original_max_position_embeddings"]
            scale = cfg.max_position_embeddings / original
            writer.add_rope_scaling_orig_ctx_len(original)
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
            extra["rope_factors_long.weight"] = np.asarray(rope["long_factor"], np.float32)
            extra["rope_factors_short.weight"] = np.asarray(rope["short_factor"], np.float32)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.upper()], layers)
    for name, tensor in torch_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        x = tensor.float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n = heads if "q_proj" in name else kv
            x = x.reshape(n, 2, x.shape[0] // n // 2, x.shape[1]).swapaxes(1, 2).reshape(x.shape)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            x = x + 1.0
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(x))
    for name, x in extra.items():
        writer.add_tensor(name, x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family,arch,overrides", [
    ("llama3_rope", "llama", {}),
    ("qwen3", "qwen3", dict(use_sliding_window=False)),  # llama.cpp's qwen3 has no sliding layers
    ("gemma2", "gemma2", dict(query_pre_attn_scalar=24)),  # llama.cpp: head_dim (but for the 27B)
    ("gemma3", "gemma3", dict(query_pre_attn_scalar=32, num_hidden_layers=6, layer_types=None)),  # pattern 6
    ("phi3", "phi3", {}),
])
def test_gguf_files_as_llama_cpp_writes_them(tmp_path, family, arch, overrides):
    pytest.importorskip("torch")
    ref = make_hf_model(family, tmp_path / "hf", **overrides)
    _write_gguf(ref, tmp_path / "model.gguf", arch)
    model = load_model(str(tmp_path / "model.gguf"))
    ids = np.random.RandomState(3).randint(0, 264, (2, 80))  # past phi3's original context, gemma's windows
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids, jnp.int32))), torch_logits(ref, ids), atol=1e-4)
    if family == "llama3_rope":  # the scaling rope_freqs encodes, recovered as transformers' parameters
        assert model.cfg.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 16)


@pytest.mark.parametrize("family", NEW)
def test_parameter_count_is_transformers(hf_models, family):
    path, ref = hf_models[family]
    model = load_model(path)
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    assert ours == model.cfg.num_params == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("model_type,says", [
    ("qwen3_moe", "model_type 'qwen3_moe' is not supported (supported: gemma, gemma2, gemma3_text, llama, mistral, "
                  "phi3, qwen2, qwen3)"),
    ("gemma3", "a vision-language checkpoint; only text decoders are supported"),
    ("mamba", "model_type 'mamba' is not supported"),
])
def test_unsupported_families_are_one_line(tmp_path, model_type, says):
    (tmp_path / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(s2d_jax.S2DError) as e:
        load_model(str(tmp_path))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_gemma3_vision_language_checkpoint_loads_its_text_decoder(tmp_path):
    """Gemma 3 4B-27B ship as `gemma3` vision-language checkpoints (`language_model.*` tensors, a `text_config`
    holding only what differs from the defaults): read as their `gemma3_text` decoder, logits equal to
    transformers' model on text input; the vision tower is not read."""
    import torch
    import transformers

    text = dict(TINY, num_key_value_heads=1, head_dim=32, num_hidden_layers=3, sliding_window=4,
                query_pre_attn_scalar=20, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=263, boi_token_index=261, eoi_token_index=262)
    torch.manual_seed(0)
    ref = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.25)
    ref.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["model_type"] == "gemma3" and "vision_config" in stored
    model = load_model(str(tmp_path))
    assert model.cfg.model_type == "gemma3_text" and model.cfg.num_layers == 3 and model.cfg.tie_embeddings
    ids = np.random.RandomState(0).randint(0, 260, (2, 12))
    np.testing.assert_allclose(np.asarray(model(ids)), torch_logits(ref, ids), atol=1e-4, rtol=1e-4)

