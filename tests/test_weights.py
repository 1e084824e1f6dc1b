"""Checkpoints: save_hf round trips through transformers and back, and every bad input is one clear error."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import s2d_jax
from s2d_jax.errors import S2DError
from conftest import FAMILIES, torch_logits


def _params(model):
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_hf_round_trips(hf_models, tmp_path, family):
    import transformers

    model = s2d_jax.load_model(hf_models[family][0])
    out = s2d_jax.save_hf(model, tmp_path / "out")
    again = s2d_jax.load_model(out)
    a, b = _params(model), _params(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert again.cfg == model.cfg
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = np.random.RandomState(0).randint(0, 264, (2, 11))
    np.testing.assert_allclose(torch_logits(ref, ids), np.asarray(model(jnp.asarray(ids, jnp.int32))), atol=1e-4)


def test_save_hf_shards_above_the_limit(hf_models, tmp_path):
    model = s2d_jax.load_model(hf_models["llama"][0])
    out = s2d_jax.save_hf(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.load(open(out + "/model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(os.path.exists(os.path.join(out, f)) for f in files)
    again = s2d_jax.load_model(out)
    a, b = _params(model), _params(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_save_hf_never_overwrites_by_default(hf_models, tmp_path):
    model = s2d_jax.load_model(hf_models["llama"][0])
    out = s2d_jax.save_hf(model, tmp_path / "m")
    before = open(os.path.join(out, "model.safetensors"), "rb").read()
    with pytest.raises(S2DError, match="already exists"):
        s2d_jax.save_hf(model, out)
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary left behind


def _copy(hf_models, tmp_path, family="llama"):
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_models[family][0], dst)
    return dst


def test_missing_path():
    with pytest.raises(S2DError, match=r"^/nonexistent/model: no such file or directory"):
        s2d_jax.load_model("/nonexistent/model")


def test_missing_config(hf_models, tmp_path):
    d = _copy(hf_models, tmp_path)
    os.remove(d / "config.json")
    with pytest.raises(S2DError, match="no config.json"):
        s2d_jax.load_model(d)


def test_unsupported_model_type_lists_supported(hf_models, tmp_path):
    d = _copy(hf_models, tmp_path)
    cfg = json.load(open(d / "config.json"))
    cfg["model_type"] = "gpt_neox"
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(S2DError, match=r"config.json: model_type 'gpt_neox' is not supported \(supported: gemma, gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3\)"):
        s2d_jax.load_model(d)


def test_pickle_only_checkpoint_is_refused(hf_models, tmp_path):
    d = _copy(hf_models, tmp_path)
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(S2DError, match=r"only pickle weights \(pytorch_model.bin\).*never unpickles"):
        s2d_jax.load_model(d)


def _rewrite(d, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors")


def test_missing_tensor(hf_models, tmp_path):
    d = _copy(hf_models, tmp_path)
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(S2DError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        s2d_jax.load_model(d)


def test_unexpected_tensor(hf_models, tmp_path):
    d = _copy(hf_models, tmp_path)
    _rewrite(d, lambda t: t.update({"model.layers.9.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(S2DError, match="unexpected tensor 'model.layers.9.extra.weight'"):
        s2d_jax.load_model(d)


def test_shape_mismatch(hf_models, tmp_path):
    d = _copy(hf_models, tmp_path)
    _rewrite(d, lambda t: t.update({"model.norm.weight": np.zeros(65, np.float32)}))
    with pytest.raises(S2DError, match=r"tensor 'model.norm.weight' has shape \(65,\), expected \(64,\)"):
        s2d_jax.load_model(d)


def test_corrupt_safetensors(hf_models, tmp_path):
    d = _copy(hf_models, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(S2DError, match="not a readable safetensors file"):
        s2d_jax.load_model(d)


def test_not_a_gguf(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"nope")
    with pytest.raises(S2DError, match="x.gguf: not a readable GGUF file"):
        s2d_jax.load_model(f)


def test_load_onto_a_mesh_places_each_shard(hf_models):
    mesh = s2d_jax.make_mesh(data=2, fsdp=2, tensor=2)
    model = s2d_jax.load_model(hf_models["llama"][0], mesh=mesh)
    qkv = model.layers[0].attn.qkv[...]  # [embed 64, kv_heads 2, group+2, head_dim]: embed/fsdp, kv_heads/tensor
    assert qkv.addressable_shards[0].data.shape == (32, 1, 4, 16)
    assert len(qkv.sharding.device_set) == 8


def test_a_gguf_header_is_parsed_once_per_file_version(tmp_path):
    """A run opens its GGUF for the tokenizer, the config and the weights: one parse per file version in a process,
    and a file written again is read again."""
    import gguf

    from s2d_jax.model.sources import gguf_reader

    def write(path, name: str):
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_name(name)
        writer.add_tensor("t", np.arange(4, dtype=np.float32))
        writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
        writer.close()

    path = tmp_path / "m.gguf"
    write(path, "first")
    first = gguf_reader(str(path))
    assert gguf_reader(str(path)) is first and first.fields["general.name"].contents() == "first"
    write(path, "second!")
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    assert gguf_reader(str(path)).fields["general.name"].contents() == "second!"
    path.write_bytes(b"nope")
    with pytest.raises(S2DError, match="m.gguf: not a readable GGUF file"):
        gguf_reader(str(path))
