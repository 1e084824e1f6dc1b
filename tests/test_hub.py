"""Models by hub id: a model laid out in a hub cache as huggingface_hub lays it out (blobs, snapshots, refs),
offline, loads by its id; an id absent offline is one line."""

import hashlib
import os
import pathlib
import shutil

import numpy as np
import pytest
from flax import nnx

import s2d_jax
from s2d_jax.cli import main
from s2d_jax.errors import S2DError


def _lay_out(cache: pathlib.Path, repo: str, files: dict[str, pathlib.Path], commit: str, refs=("main",)):
    """`files` (name -> source) in huggingface_hub's cache layout: content-addressed blobs, a snapshot per commit
    of links to them, and refs naming the commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "snapshots" / commit).mkdir(parents=True)
    (root / "refs").mkdir(exist_ok=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            shutil.copyfile(source, blob)
        os.symlink(os.path.relpath(blob, root / "snapshots" / commit), root / "snapshots" / commit / name)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # the suite never reaches the hub (conftest)
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _params(model):
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}


def test_a_model_in_the_hub_cache_loads_by_its_id(hf_models, hub_cache):
    path, _ = hf_models["llama"]
    src = pathlib.Path(path)
    _lay_out(hub_cache, "acme/tiny-llama", {p.name: p for p in src.iterdir() if p.is_file()}, "a" * 40,
             refs=("main", "v1"))
    want = _params(s2d_jax.load_model(path))
    for name, revision in (("acme/tiny-llama", ""), ("hf://acme/tiny-llama", "v1")):
        got = _params(s2d_jax.load_model(name, revision=revision))
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_plan_reads_a_hub_model_by_id(hf_models, hub_cache, tmp_path, capsys):
    path, _ = hf_models["qwen3"]
    src = pathlib.Path(path)
    _lay_out(hub_cache, "acme/tiny-qwen3", {"config.json": src / "config.json"}, "b" * 40)  # shapes only
    assert main(["plan", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "plan"),
                 "--config.model.path=acme/tiny-qwen3"]) == 0
    assert "per device" in capsys.readouterr().out.lower()


def test_a_gguf_file_of_a_hub_repo_by_id(smollm2_gguf, hub_cache, tmp_path):
    gguf = pathlib.Path(smollm2_gguf)
    _lay_out(hub_cache, "acme/smol-gguf", {gguf.name: gguf}, "c" * 40)
    cfg = s2d_jax.model.read_config(s2d_jax.model.hub.resolve(f"acme/smol-gguf/{gguf.name}"))
    assert cfg.num_layers == 30 and cfg.hidden_size == 576


def test_an_id_absent_offline_is_one_line(hub_cache, tmp_path, capsys):
    with pytest.raises(S2DError) as e:
        s2d_jax.load_model("acme/absent-model")
    assert str(e.value) == ("model.path 'acme/absent-model': not a local path, and not in the hub cache "
                            "(HF_HUB_OFFLINE is set); download it where the hub is reachable (`hf download "
                            "acme/absent-model`) into HF_HOME, or give a local path")
    assert main(["generate", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
                 "--config.model.path=acme/absent-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s2d: error: model.path 'acme/absent-model': not a local path") and err.count("\n") == 1
    assert not (tmp_path / "w").exists()  # refused before anything was written
    # a tokenizer or teacher named by a hub id not in the cache: the error names the key the user set
    for key in ("tokenizer", "teacher.path"):
        assert main(["generate", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
                     f"--config.{key}=acme/absent-model"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"s2d: error: {key} 'acme/absent-model': not a local path") and err.count("\n") == 1
    with pytest.raises(S2DError, match=r"^not/a/model: no such file or directory"):  # not an id: a missing path
        s2d_jax.load_model("not/a/model")
