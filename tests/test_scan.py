"""Scanned layers (`model.scan_layers`): the same logits, exports and training as unrolled layers, and a program
whose size does not grow with depth."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from conftest import torch_logits
from s2d_jax.model import PRESETS, init_model, load_model, save_hf

IDS = np.random.default_rng(2).integers(0, 264, (2, 13))


def test_scanned_load_matches_transformers_and_exports_the_same_tensors(hf_models, tmp_path):
    path, torch_model = hf_models["qwen2"]
    scanned = load_model(path, scan_layers=True)
    assert scanned.layers.attn.qkv[...].shape[0] == scanned.cfg.num_layers
    np.testing.assert_allclose(scanned(IDS), torch_logits(torch_model, IDS), atol=1e-4)
    save_hf(scanned, tmp_path / "scanned")
    save_hf(load_model(path), tmp_path / "unrolled")
    a, b = load_file(tmp_path / "scanned" / "model.safetensors"), load_file(tmp_path / "unrolled" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_scanned_training_equals_unrolled(tmp_path):
    from test_train import _trainer

    results = {}
    for scan in (False, True):  # the same initial weights, stacked or not
        model = init_model(PRESETS["tiny"].replace(scan_layers=scan), seed=0)
        trainer = _trainer(tmp_path / str(scan), "train.steps=3", "train.remat=full", model=model)
        trainer.fit()
        results[scan] = trainer.current_model()
    np.testing.assert_allclose(results[True](IDS), results[False](IDS), atol=1e-5)


def _hlo_size(layers: int, scan: bool) -> int:
    cfg = PRESETS["tiny"].replace(num_layers=layers, scan_layers=scan)
    graphdef, state = nnx.split(init_model(cfg, seed=0))
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return len(fn.lower(state, jax.ShapeDtypeStruct((1, 16), jnp.int32)).as_text())


def test_the_scanned_program_does_not_grow_with_depth():
    assert _hlo_size(8, True) < 1.1 * _hlo_size(2, True)
    assert _hlo_size(8, False) > 2 * _hlo_size(2, False)
