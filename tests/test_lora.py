"""LoRA: merged = unmerged, only adapters train, adapter-only checkpoints resume bitwise, the PEFT export loads in
peft over the transformers base with our logits; precision rules for full fine-tuning; the LoRA stage end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import make_hf_model, torch_logits
from s2d_jax.cli import main
from s2d_jax.config import load_config
from s2d_jax.errors import S2DError
from s2d_jax.model import PRESETS, init_model, load_model, lora, save_hf
from s2d_jax.system2.tasks import get_task
from s2d_jax.tokenizer import byte_tokenizer
from s2d_jax.train import Trainer

IDS = np.random.default_rng(3).integers(0, 264, (2, 11))


def _randomise_b(model, seed=0):
    """Adapters start at B = 0 (a no-op); give them weight so that the checks below can fail."""
    for n, ((_, target), adapter) in enumerate(sorted(lora.adapters(model).items(), key=str)):
        adapter.b[...] = jax.random.normal(jax.random.key(seed + n), adapter.b[...].shape) * 0.05


@pytest.mark.parametrize("scan", [False, True])
def test_merged_equals_unmerged_and_new_adapters_change_nothing(scan):
    model = init_model(PRESETS["tiny"].replace(scan_layers=scan), seed=0)
    before = model(IDS)
    lora.add(model, rank=4, alpha=8.0)
    np.testing.assert_array_equal(model(IDS), before)  # B = 0
    _randomise_b(model)
    unmerged = model(IDS)
    assert np.abs(unmerged - before).max() > 1e-3
    merged = lora.merged(model)
    assert not nnx.state(merged, lora.LoRAParam) and merged.cfg.lora_rank == 0
    np.testing.assert_allclose(merged(IDS), unmerged, atol=2e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "phi3"])
def test_peft_loads_our_adapter_over_the_transformers_base(tmp_path, family):
    peft = pytest.importorskip("peft")
    torch_model = make_hf_model(family, tmp_path / "base", seed=4)
    model = load_model(str(tmp_path / "base"))
    lora.add(model, rank=4, alpha=8.0, targets=lora.TARGETS)
    expected = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if family == "phi3" else set(lora.TARGETS)
    assert set(model.cfg.lora_targets) == expected  # Phi-3's fused modules get one adapter each, as in PEFT
    _randomise_b(model, seed=7)
    ours = np.asarray(model(IDS))
    lora.save_peft(model, str(tmp_path / "adapter"), base_model=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    with_adapter = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(torch_logits(with_adapter, IDS), ours, atol=1e-4)
    save_hf(model, tmp_path / "merged")  # merged on export: transformers alone reproduces it
    import transformers
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(torch_logits(merged, IDS), ours, atol=1e-4)


def _pairs(path, n=12):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for e in get_task("last_letters").generate(n, seed=5, num_words=3):
            f.write(json.dumps({"id": e.id, "prompt": e.input, "target": e.label}) + "\n")
    return str(path)


def _lora_trainer(workdir, *overrides, model=None):
    config = load_config("configs/tiny.py", [f"train.data={_pairs(workdir / 'pairs.jsonl')}", "train.lora_rank=4",
                                             "train.learning_rate=1e-2", *overrides])
    return Trainer(model or init_model(PRESETS["tiny"], seed=0), byte_tokenizer(), config, str(workdir))


def test_only_adapters_train_and_checkpoints_hold_only_them(tmp_path):
    model = init_model(PRESETS["tiny"], seed=0)
    base = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    trainer = _lora_trainer(tmp_path, "train.steps=4", model=model)
    assert {x.dtype for x in jax.tree.leaves(trainer.params)} == {jnp.dtype("float32")}
    start = jax.tree.map(np.asarray, trainer.params)
    trainer.fit()
    after = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for key, value in base.items():
        if "lora" not in "/".join(map(str, key)):
            np.testing.assert_array_equal(np.asarray(after[key][...]), value)  # the base is frozen
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), trainer.params, start)
    assert max(jax.tree.leaves(moved)) > 0
    n_adapter = sum(np.size(x) for x in jax.tree.leaves(trainer.params))
    assert n_adapter < PRESETS["tiny"].num_params / 4
    opt_leaves = [x for x in jax.tree.leaves(trainer.opt_state) if np.ndim(x) > 0]
    assert sum(np.size(x) for x in opt_leaves) == 2 * n_adapter  # AdamW moments of the adapters alone


def test_adapter_checkpoints_resume_bitwise(tmp_path):
    full = _lora_trainer(tmp_path / "full", "train.steps=6", "train.checkpoint_every=3")
    full.fit()
    first = _lora_trainer(tmp_path / "cut", "train.steps=3", "train.checkpoint_every=3")
    first.fit()
    resumed = _lora_trainer(tmp_path / "cut", "train.steps=6", "train.checkpoint_every=3")
    assert resumed.fit().resumed_from == 3
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_full_fine_tuning_keeps_float32_masters_and_refuses_bfloat16(tmp_path):
    config = ["model.dtype=float32", "model.compute_dtype=bfloat16"]
    pairs = _pairs(tmp_path / "p.jsonl")
    cfg = load_config("configs/tiny.py", [*config, f"train.data={pairs}"])
    model = init_model(PRESETS["tiny"].replace(param_dtype="float32", dtype="bfloat16"), seed=0)
    trainer = Trainer(model, byte_tokenizer(), cfg, str(tmp_path))
    assert {x.dtype for x in jax.tree.leaves(trainer.params)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(trainer.opt_state) if np.ndim(x)} == {jnp.dtype("float32")}
    bf16 = init_model(PRESETS["tiny"].replace(param_dtype="bfloat16", dtype="bfloat16"), seed=0)
    with pytest.raises(S2DError, match="model.dtype.*bfloat16 parameters with full fine-tuning"):
        Trainer(bf16, byte_tokenizer(), load_config("configs/tiny.py", [f"train.data={pairs}"]), str(tmp_path / "x"))
    lora_cfg = load_config("configs/tiny.py", [f"train.data={pairs}", "train.lora_rank=2"])
    Trainer(bf16, byte_tokenizer(), lora_cfg, str(tmp_path / "y"))  # a frozen bf16 base is fine


def test_lora_paper_config_end_to_end_on_a_tiny_model(tmp_path):
    """The shipped paper config as it is (LoRA, scanned layers, bf16 compute, float32 masters) through `s2d run`
    with only the model made tiny and the sizes small: model/ (merged) and adapter/ (PEFT) written, eval on model/.
    Reads Kojima et al.'s held-out lists by their registry name, as the config names them."""
    from conftest import data

    data("last_letters")
    workdir = tmp_path / "run"
    assert main(["run", "--config", "configs/rar2_last_letters.py", "--workdir", str(workdir),
                 "--config.model.path=", "--config.model.preset=tiny", "--config.tokenizer=bytes",
                 "--config.mesh.fsdp=2", "--config.mesh.data=4",
                 "--config.task.n=4", "--config.generate.samples=2", "--config.generate.max_batch=8",
                 "--config.program.max_new_tokens=24", "--config.filter.min_share=0.0", "--config.train.steps=2",
                 "--config.train.batch_size=8", "--config.train.eval_every=0", "--config.eval.n=4",
                 "--config.eval.max_new_tokens=8", f"--config.train.data={_pairs(tmp_path / 'pairs.jsonl')}"]) == 0
    assert (workdir / "rollouts.jsonl").exists() and (workdir / "distill.jsonl").exists()
    config = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and set(config["target_modules"]) == set(lora.TARGETS)
    assert "distilled" in json.loads((workdir / "eval.json").read_text())
    merged = load_model(str(workdir / "model"))
    assert not nnx.state(merged, lora.LoRAParam)
    assert os.path.exists(workdir / "checkpoints")


def test_bad_lora_targets_are_one_line(tmp_path, capsys):
    assert main(["train", "--config", "configs/tiny.py", "--config.pretrain.steps=0", "--workdir", str(tmp_path),
                 f"--config.train.data={_pairs(tmp_path / 'p.jsonl')}", "--config.train.lora_rank=2",
                 "--config.train.lora_targets=('q_proj', 'wq')"]) == 2
    assert "'wq' is not a LoRA target" in capsys.readouterr().err


def test_a_fused_checkpoint_refuses_part_of_a_fused_module(tmp_path):
    make_hf_model("phi3", tmp_path / "base")
    model = load_model(str(tmp_path / "base"))
    with pytest.raises(S2DError, match="phi3 fuses q_proj, k_proj, v_proj into qkv_proj"):
        lora.add(model, rank=2, alpha=4.0, targets=("q_proj", "o_proj"))
    with pytest.raises(S2DError, match="'qkv_proj' is fused only in Phi-3 checkpoints"):
        lora.add(init_model(PRESETS["tiny"]), rank=2, alpha=4.0, targets=("qkv_proj",))
