"""The generation mesh (`generate.mesh`): chosen for decoding, checked against the model, and the weights moved onto
it on device. 8 fake CPU devices: training with FSDP over all 8, decoding tensor-parallel."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import s2d_jax
from s2d_jax import mesh as mesh_lib
from s2d_jax.cli import main
from s2d_jax.errors import S2DError
from s2d_jax.model import PRESETS, init_model
from s2d_jax.sampling.reshard import reshard

GB = 1 << 30
TRAIN = {"data": 1, "fsdp": -1, "tensor": 1}
AUTO = {"data": 0, "fsdp": 0, "tensor": 0}


def test_auto_is_tensor_parallel_within_a_host_and_data_across():
    llama = PRESETS["llama3-8b"].replace(dtype="bfloat16")  # 32 heads, 8 kv heads, 16 GB of bf16 weights
    sizes = lambda count, per_host, platform="tpu", gb=16, cfgs=(llama,): mesh_lib.generation_sizes(
        AUTO, TRAIN, cfgs, count, per_host, platform, gb * GB)
    assert sizes(8, 8) == {"data": 1, "fsdp": 1, "tensor": 8}  # a v5e-8 host: every chip reads its eighth in place
    assert sizes(32, 4) == {"data": 8, "fsdp": 1, "tensor": 4}  # a v5p-64: a replica per 4-chip host
    assert sizes(1, 1, "cuda", 80) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert sizes(16, 8, gb=3) == {"data": 1, "fsdp": 2, "tensor": 8}  # 2 GB a chip: over half of 3 GB, so FSDP
    assert sizes(8, 8, "cpu") == {"data": 1, "fsdp": 8, "tensor": 1}  # CPU: the training mesh
    smol = PRESETS["smollm2-135m"]  # 9 heads, 3 kv heads: no split of 8 chips divides them
    assert sizes(8, 8, cfgs=(smol,)) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert sizes(8, 8, cfgs=(llama, PRESETS["tiny"])) == {"data": 4, "fsdp": 1, "tensor": 2}  # a teacher too


def test_a_set_mesh_is_checked_against_the_model():
    tiny = PRESETS["tiny"]  # 4 heads, 2 kv heads
    given = lambda **m: mesh_lib.generation_sizes(m, TRAIN, (tiny,), 8, 8, "tpu", GB)
    assert given(data=-1, fsdp=1, tensor=2) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(S2DError, match=r"'generate.mesh.tensor': 4 does not divide .* \(2, 4\); would work: 1, 2$"):
        given(data=2, fsdp=1, tensor=4)
    with pytest.raises(S2DError, match="'generate.mesh': .* needs 6 devices, but 8 are available"):
        given(data=3, fsdp=1, tensor=2)
    with pytest.raises(S2DError, match="set all three axes"):
        given(data=0, fsdp=0, tensor=2)


def _models():
    cfg = PRESETS["tiny"]
    train_mesh = s2d_jax.make_mesh(data=1, fsdp=8)
    gen_mesh = s2d_jax.make_mesh(data=4, fsdp=1, tensor=2)
    return init_model(cfg, seed=3, mesh=train_mesh), train_mesh, gen_mesh


def test_reshard_round_trip_is_bitwise_and_lands_on_the_rules_layout():
    model, train_mesh, gen_mesh = _models()
    before = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}
    there = reshard(model, gen_mesh)
    for key, var in nnx.to_flat_state(nnx.state(there)):
        want = mesh_lib.named_sharding(mesh_lib.param_axes(var), var.shape, gen_mesh)
        assert var[...].sharding.is_equivalent_to(want, var.ndim), key
        np.testing.assert_array_equal(np.asarray(var[...]), before[key])
    qkv = there.layers[0].attn.qkv[...]  # [embed, kv_heads, group + 2, hd]: kv heads split over tensor, not fsdp
    assert qkv.sharding.spec == jax.P(None, "tensor", None, None)
    back = reshard(there, train_mesh, donate=True)
    assert there.layers[0].attn.qkv[...].is_deleted()  # donated: freed as its copy landed
    for key, var in nnx.to_flat_state(nnx.state(back)):
        assert var[...].sharding.is_equivalent_to(
            mesh_lib.named_sharding(mesh_lib.param_axes(var), var.shape, train_mesh), var.ndim)
        np.testing.assert_array_equal(np.asarray(var[...]), before[key])  # bitwise, both ways
    single = reshard(back, None)
    assert all(len(v[...].sharding.device_set) == 1 for _, v in nnx.to_flat_state(nnx.state(single)))


def test_greedy_on_the_generation_mesh_equals_the_training_mesh():
    model, train_mesh, gen_mesh = _models()
    tok = s2d_jax.load_tokenizer("bytes")
    prompts = [f"List {i}: " + "ab cd ef"[: i + 2] for i in range(8)]
    outs = {}
    for name, (m, mesh) in {"train": (model, train_mesh), "gen": (reshard(model, gen_mesh), gen_mesh)}.items():
        sampler = s2d_jax.Sampler(m, tok, mesh=mesh, max_batch=8)
        outs[name] = [s[0].token_ids for s in sampler.generate(prompts, max_new_tokens=24, progress=False)]
    assert outs["gen"] == outs["train"] and all(len(ids) > 0 for ids in outs["gen"])


TINY = ["--config", "configs/tiny.py", "--config.pretrain.steps=0", "--config.program.name=rar2",
        "--config.program.max_new_tokens=24", "--config.task.size=3", "--config.mesh.data=1",
        "--config.mesh.fsdp=-1", "--config.generate.temperature=0", "--config.generate.samples=1", "--config.train.steps=6",
        "--config.train.batch_size=8"]


def test_the_generate_stage_decodes_on_its_own_mesh(tmp_path, caplog):
    """`s2d generate` with FSDP for training and a tensor-parallel generation mesh: the same greedy rollouts as on
    the training mesh; and train's System 1 checks (`train.eval_every`) run on the generation mesh."""
    rollouts = {}
    for name, extra in {"train": [], "gen": ["--config.generate.mesh.data=4", "--config.generate.mesh.fsdp=1",
                                             "--config.generate.mesh.tensor=2"]}.items():
        caplog.clear()
        with caplog.at_level("INFO", logger="s2d"):
            assert main(["generate", *TINY, *extra, "--workdir", str(tmp_path / name)]) == 0
        assert ("generation mesh {'data': 4, 'fsdp': 1, 'tensor': 2}" in caplog.text) == (name == "gen")
        rows = [json.loads(line) for line in (tmp_path / name / "rollouts.jsonl").read_text().splitlines()]
        rollouts[name] = [(r["id"], [s["output"] for s in r["stages"]]) for r in rows]
    assert rollouts["gen"] == rollouts["train"] and len(rollouts["gen"]) == 6
    gen = ["--config.generate.mesh.data=4", "--config.generate.mesh.fsdp=1", "--config.generate.mesh.tensor=2"]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"List: {w}", "target": w[0]}) + "\n" for w in ("ka", "mo", "ti")))
    assert main(["train", *TINY, *gen, "--config.train.eval_every=6", f"--config.train.data={data}",
                 "--workdir", str(tmp_path / "distil")]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "distil" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval/accuracy" in m] == [6]
