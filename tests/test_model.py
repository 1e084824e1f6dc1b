"""The decoder against transformers, and its own invariants (padding, packing, cache)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import s2d_jax
from s2d_jax.model import KVCache, PRESETS, ModelConfig, init_model
from conftest import FAMILIES, torch_logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(hf_models, family):
    path, ref = hf_models[family]
    model = s2d_jax.load_model(path)
    ids = np.random.RandomState(1).randint(0, 264, (3, 17))
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert ours.dtype == np.float32 and ours.shape == (3, 17, 264)
    assert np.abs(ours - torch_logits(ref, ids)).max() <= 1e-4


def test_families_are_config_fields(hf_models):
    cfgs = {f: s2d_jax.load_model(hf_models[f][0]).cfg for f in FAMILIES}
    assert cfgs["qwen2"].qkv_bias and not cfgs["llama"].qkv_bias
    assert cfgs["gemma"].norm_plus_one and cfgs["gemma"].embed_scale and cfgs["gemma"].tie_embeddings
    assert cfgs["gemma"].activation == "gelu_tanh" and cfgs["llama"].activation == "silu"
    assert cfgs["mistral"].sliding_window == 6
    assert cfgs["llama3_rope"].rope_scaling[0] == "llama3" and cfgs["llama"].rope_scaling is None


def test_bfloat16_params_and_compute(hf_models):
    path, ref = hf_models["llama"]
    model = s2d_jax.load_model(path, dtype="bfloat16")
    assert model.layers[0].attn.qkv[...].dtype == jnp.bfloat16
    ids = np.random.RandomState(2).randint(0, 264, (2, 9))
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert ours.dtype == np.float32
    ref_logits = torch_logits(ref, ids)
    assert np.abs(ours - ref_logits).max() < 0.1 * np.abs(ref_logits).max()  # bf16 rounding, not a wrong model


def _tiny(**changes):
    return init_model(PRESETS["tiny"].replace(**changes), seed=3)


def test_left_padding_does_not_change_logits():
    model = _tiny()
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (1, 7)), jnp.int32)
    plain = model(ids)
    pad = 5
    padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), ids], 1)
    positions = jnp.maximum(jnp.arange(pad + 7) - pad, 0)[None]
    segments = (jnp.arange(pad + 7) >= pad).astype(jnp.int32)[None]
    out = model(padded, positions, segments)[:, pad:]
    np.testing.assert_allclose(out, plain, atol=1e-5)


def test_packed_segments_do_not_attend_to_each_other():
    model = _tiny()
    rng = np.random.RandomState(0)
    a, b = rng.randint(0, 256, (1, 6)), rng.randint(0, 256, (1, 4))
    packed = jnp.asarray(np.concatenate([a, b], 1), jnp.int32)
    positions = jnp.asarray([list(range(6)) + list(range(4))])
    segments = jnp.asarray([[1] * 6 + [2] * 4])
    out = model(packed, positions, segments)
    np.testing.assert_allclose(out[:, :6], model(jnp.asarray(a, jnp.int32)), atol=1e-5)
    np.testing.assert_allclose(out[:, 6:], model(jnp.asarray(b, jnp.int32)), atol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
def test_cached_decode_matches_full_forward(window):
    model = _tiny(sliding_window=window)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 10)), jnp.int32)
    full = model(ids)
    prefix = 6
    hidden, kvs = model.forward(ids[:, :prefix])
    max_len = 12
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, max_len - prefix), (0, 0)))
    cache = KVCache(tuple(pad(k) for k, _ in kvs), tuple(pad(v) for _, v in kvs),
                    jnp.arange(max_len)[None].repeat(2, 0) < prefix, jnp.int32(prefix))
    steps = [model.logits(hidden[:, -1])]
    for t in range(prefix, 10):
        hidden, cache = model.forward(ids[:, t:t + 1], jnp.full((2, 1), t), cache=cache)
        steps.append(model.logits(hidden[:, -1]))
    np.testing.assert_allclose(jnp.stack(steps[:-1], 1), full[:, prefix - 1:9], atol=1e-5)
    assert int(cache.index) == 10 and bool(cache.valid[:, :10].all()) and not bool(cache.valid[:, 10:].any())


def test_config_from_hf_errors():
    with pytest.raises(s2d_jax.S2DError, match=r"model_type 'gpt2' is not supported \(supported: gemma, gemma2, gemma3_text, llama"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(s2d_jax.S2DError, match="missing key 'intermediate_size'"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_attention_heads": 2,
                             "num_hidden_layers": 1})
    with pytest.raises(s2d_jax.S2DError, match="rope_type 'yarn' is not supported"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_attention_heads": 2,
                             "num_hidden_layers": 1, "intermediate_size": 8, "rope_parameters": {"rope_type": "yarn"}})


def test_num_params_counts_the_real_arrays():
    for name in ("tiny",):
        model = init_model(PRESETS[name])
        n = sum(x.size for x in jax.tree.leaves(__import__("flax").nnx.state(model)))
        assert n == model.cfg.num_params
