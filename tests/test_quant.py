"""int8 weights for generation (`generate.weights_dtype=int8`, s2d_jax/model/quant.py): per-channel symmetric
int8 projections, read back through the same model code, sharded by the same rules, sized by the plan."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import s2d_jax
from s2d_jax.cli import main
from s2d_jax.model import PRESETS, init_model, quant

IDS = jnp.asarray(np.random.RandomState(0).randint(0, 256, (4, 24)), jnp.int32)


@pytest.mark.parametrize("scan", [False, True])
def test_int8_projections_keep_the_logits(scan):
    cfg = PRESETS["tiny"].replace(tie_embeddings=False, scan_layers=scan)
    model = init_model(cfg, seed=1)
    before = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}
    q = quant.quantize(model)
    block = q.layers if scan else q.layers[0]
    assert block.attn.qkv[...].dtype == jnp.int8 and block.mlp.gate_up[...].dtype == jnp.int8
    assert q.lm_head[...].dtype == jnp.int8 and q.embed[...].dtype == model.embed[...].dtype  # embeddings stay
    lead = (cfg.num_layers,) if scan else ()
    d, k, c, hd, i = cfg.hidden_size, cfg.num_kv_heads, cfg.group_size + 2, cfg.head_dim, cfg.intermediate_size
    assert block.attn.qkv_scale[...].shape == lead + (1, k, c, hd)  # one scale per output channel
    assert block.mlp.gate_up_scale[...].shape == lead + (2, 1, i) and block.mlp.down_scale[...].shape == lead + (1, d)
    # every int8 value times its scale is within half a step of the float weight
    w, s = np.asarray(block.mlp.down[...], np.float32), np.asarray(block.mlp.down_scale[...])
    ref = np.asarray((model.layers if scan else model.layers[0]).mlp.down[...])
    assert np.abs(w * s - ref).max() <= s.max() / 2 + 1e-7
    a, b = np.asarray(model(IDS)), np.asarray(q(IDS))
    assert np.abs(a - b).max() <= 0.03 * np.abs(a).max()
    assert not np.array_equal(a, b)  # it did quantize
    after = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the float model is untouched
    assert quant.quantize(model, "") is model


def test_int8_weights_shard_by_the_rules_and_match_one_device():
    cfg = PRESETS["tiny"].replace(tie_embeddings=False)
    mesh = s2d_jax.make_mesh(data=4, fsdp=1, tensor=2)
    single = quant.quantize(init_model(cfg, seed=2))
    sharded = quant.quantize(init_model(cfg, seed=2, mesh=mesh))
    qkv, scale = sharded.layers[0].attn.qkv[...], sharded.layers[0].attn.qkv_scale[...]
    assert qkv.sharding.spec == jax.P(None, "tensor", None, None)
    assert scale.sharding.spec == jax.P(None, "tensor", None, None)
    forward = nnx.jit(lambda model, ids: model(ids))
    with jax.set_mesh(mesh):
        out = forward(sharded, IDS)
    np.testing.assert_allclose(np.asarray(out), np.asarray(forward(single, IDS)), atol=1e-5)


TINY = ["--config", "configs/tiny.py", "--config.pretrain.steps=0", "--config.program.name=rar2",
        "--config.program.max_new_tokens=24", "--config.task.size=3", "--config.generate.temperature=0",
        "--config.generate.samples=1"]


def test_int8_generation_runs_and_the_plan_counts_its_bytes(tmp_path):
    """`s2d generate` with int8 weights and cache, and `s2d plan`'s bytes for both."""
    for dtype in ("", "int8"):  # int8 weights and an int8 KV cache together
        workdir = tmp_path / (dtype or "float")
        int8 = [f"--config.generate.weights_dtype={dtype}", f"--config.generate.cache_dtype={dtype}"]
        assert main(["generate", *TINY, *int8, "--workdir", str(workdir)]) == 0
        assert len((workdir / "rollouts.jsonl").read_text().splitlines()) == 6
        assert main(["plan", *TINY, "--config.model.compute_dtype=bfloat16", *int8,
                     "--workdir", str(workdir / "plan")]) == 0
    plans = {d: json.loads((tmp_path / d / "plan" / "plan.json").read_text()) for d in ("float", "int8")}
    cfg = PRESETS["tiny"]
    embed = cfg.vocab_size * cfg.hidden_size * 2  # tied: the embedding stays in bf16
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size * 2
    projections = (cfg.num_params - cfg.vocab_size * cfg.hidden_size - norms // 2)
    assert plans["float"]["generate_params"] == embed + norms + 2 * projections
    scales = plans["int8"]["generate_params"] - (embed + norms + projections)
    assert 0 < scales < projections // 8  # one float32 per output channel
    assert plans["float"]["params"] == plans["int8"]["params"]  # training is not quantised
    hd = cfg.head_dim  # the cache: a byte a value and a float32 scale a vector, against two bytes a value
    assert plans["int8"]["kv_cache"] * 2 * hd == plans["float"]["kv_cache"] * (hd + 4)
