"""`s2d plan`: its per-device figures against the real arrays of configs/tiny.py on 8 devices, and its advice."""

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax import mesh as mesh_lib
from s2d_jax.cli import main
from s2d_jax.config import load_config
from s2d_jax.model import PRESETS, init_model
from s2d_jax.build import build_mesh
from s2d_jax.plan.estimate import mesh_shape, plan, shard_bytes
from s2d_jax.sampling.cache import CACHE_AXES
from s2d_jax.tokenizer import byte_tokenizer
from s2d_jax.train import Trainer

MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def _device0_bytes(tree) -> int:
    device = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) if getattr(x, "ndim", 0) > 0
               for s in x.addressable_shards if s.device == device)


def test_plan_matches_the_real_arrays(tmp_path):
    config = load_config("configs/tiny.py", [*MESH, "pretrain.steps=0"])
    mesh = build_mesh(config)
    p = plan(config, mesh_shape(config.mesh, 8))
    model = init_model(PRESETS["tiny"], mesh=mesh)
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "Take the last letters of \\"Ab Cd\\".", "target": "bd"}\n')
    trainer = Trainer(model, byte_tokenizer(), load_config("configs/tiny.py", [
        *MESH, f"train.data={tmp_path / 'pairs.jsonl'}"]), str(tmp_path), mesh=mesh)
    assert p["params"] == _device0_bytes(trainer.params)
    assert p["optimizer"] == _device0_bytes(trainer.opt_state)  # AdamW's two moments (the step count is a scalar)
    cache = jax.device_put(jnp.zeros(p["kv_cache_shape"], jnp.float32),
                           mesh_lib.named_sharding(CACHE_AXES, p["kv_cache_shape"], mesh))
    assert p["kv_cache"] == 2 * PRESETS["tiny"].num_layers * _device0_bytes(cache)
    assert p["params"] < sum(np.asarray(x).nbytes for x in jax.tree.leaves(trainer.params))  # really sharded


def test_shard_bytes_follow_the_rules():
    mesh = mesh_shape(load_config("configs/tiny.py", MESH).mesh, 8)
    assert shard_bytes((64, 2, 4, 16), "float32", ("embed", "kv_heads", None, None), mesh) == 32 * 1 * 4 * 16 * 4
    assert shard_bytes((3, 5), "bfloat16", ("kv_heads", None), mesh) == 3 * 5 * 2  # 3 does not split over 2


def test_plan_stage_writes_and_advises(tmp_path, capsys):
    assert main(["plan", "--config", "configs/tiny.py", "--workdir", str(tmp_path)]) == 0
    assert (tmp_path / "plan.json").exists() and "params" in capsys.readouterr().out
    args = ["plan", "--config", "configs/rar2_last_letters.py", "--workdir", str(tmp_path), "--config.model.path=",
            "--config.model.preset=llama3-8b", "--config.plan.devices=8"]
    assert main(args) == 0  # the shipped 8B config (LoRA) fits a v5e-8 host (16 GB per chip)
    assert main([*args, "--config.plan.devices=1", "--config.plan.device_gb=80"]) == 0  # and one 80 GB GPU
    full = ["plan", "--config", "configs/rar2_last_letters_full.py", "--workdir", str(tmp_path), "--config.model.path=",
            "--config.model.preset=llama3-8b"]
    assert main(full) == 0  # the full fine-tune fits a v5p-64 (32 chips x 95 GB)
    assert main([*full, "--config.plan.devices=8", "--config.plan.device_gb=16"]) == 2  # but not a v5e-8
    assert main([*args, "--config.train.remat=none", "--config.mesh.fsdp=1", "--config.mesh.data=-1"]) == 2
    err = capsys.readouterr().err
    assert "train needs" in err and "raise mesh.fsdp" in err and "remat=full" in err


def test_plan_matches_the_compiled_step_memory(tmp_path):
    """The plan's train total against XLA's memory analysis of the compiled step (arguments + temporaries +
    outputs not aliased to donated inputs), one device: within 30% for full fine-tuning, LoRA, remat and longer
    rows (measured 0.76-0.91 when written)."""
    from s2d_jax.build import build_model

    (tmp_path / "p.jsonl").write_text('{"prompt": "Take the last letters of \\"Ab Cd\\".", "target": "bd"}\n' * 8)
    for extra in ([], ["train.lora_rank=4"], ["train.remat=full"], ["train.max_len=512", "train.batch_size=8"],
                  ["model.preset=toy", "train.batch_size=8"]):
        config = load_config("configs/tiny.py", ["mesh.data=1", "pretrain.steps=0",
                                                 f"train.data={tmp_path / 'p.jsonl'}", *extra])
        p = plan(config, mesh_shape(config.mesh, 1))
        trainer = Trainer(build_model(config, base=False, trainable=True), byte_tokenizer(), config, str(tmp_path))
        batch = trainer._global(next(iter(trainer.data)))
        m = trainer._step.lower(trainer.params, trainer.opt_state, batch, trainer.frozen).compile().memory_analysis()
        compiled = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                    - m.alias_size_in_bytes)
        assert 0.7 < p["train_total"] / compiled < 1.3, (extra, p["train_total"], compiled)
