"""The `s2d` command and experiment configs: every bad input is one line and a non-zero exit."""

import json
import subprocess
import sys

import pytest

from s2d_jax.cli import main
from s2d_jax.config import load_config
from s2d_jax.errors import S2DError


def test_help_lists_stages_and_usage():
    out = subprocess.run([sys.executable, "-m", "s2d_jax.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "s2d STAGE --config configs/NAME.py" in out.stdout and "convert" in out.stdout


def test_overrides_are_typed():
    c = load_config("configs/tiny.py", ["mesh.tensor=2", "model.dtype=bfloat16", "seed=7"])
    assert (c.mesh.tensor, c.model.dtype, c.seed) == (2, "bfloat16", 7)


@pytest.mark.parametrize("override, message", [
    ("model.pth=x", "--config.model.pth: unknown key 'model.pth' (did you mean 'model.path'?)"),
    ("mesh.tensr=2", "--config.mesh.tensr: unknown key 'mesh.tensr' (did you mean 'mesh.tensor'?)"),
    ("mesh.tensor=two", "--config.mesh.tensor=two: key 'mesh.tensor' expects int, got 'two'"),
    ("seed", "--config.seed: expected --config.KEY=VALUE"),
])
def test_bad_overrides(override, message):
    with pytest.raises(S2DError) as e:
        load_config("configs/tiny.py", [override])
    assert str(e.value) == message


def test_bad_config_files(tmp_path):
    bad_key = tmp_path / "bad_key.py"
    bad_key.write_text("def get_config():\n    return {'modle': {'path': 'x'}}\n")
    with pytest.raises(S2DError, match=r"bad_key.py: unknown key 'modle' \(did you mean 'model'\?\)"):
        load_config(str(bad_key))
    bad_type = tmp_path / "bad_type.py"
    bad_type.write_text("def get_config():\n    return {'mesh': {'data': 'all'}}\n")
    with pytest.raises(S2DError, match="bad_type.py: key 'mesh.data' expects int, got 'all'"):
        load_config(str(bad_type))
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def get_config(:\n")
    with pytest.raises(S2DError, match="syntax.py: line 1:"):
        load_config(str(syntax))
    no_fn = tmp_path / "no_fn.py"
    no_fn.write_text("x = 1\n")
    with pytest.raises(S2DError, match=r"no_fn.py: no get_config\(\) function"):
        load_config(str(no_fn))
    with pytest.raises(S2DError, match="missing.py: no such config file"):
        load_config(str(tmp_path / "missing.py"))


def _run(args):
    return subprocess.run([sys.executable, "-m", "s2d_jax.cli", *args], capture_output=True, text=True)


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    out = _run(["convert", "--config", "configs/tiny.py", "--workdir", str(tmp_path), "--config.model.pth=x"])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "s2d: error: --config.model.pth: unknown key 'model.pth' (did you mean 'model.path'?)"
    assert "Traceback" not in out.stderr
    out = _run(["convert", "--config", "configs/tiny.py", "--workdir", str(tmp_path),
                "--config.model.path=/no/such/model"])
    assert out.returncode == 2 and "s2d: error: config key 'model.path': /no/such/model: no such file or directory" in out.stderr
    assert _run(["nostage", "--config", "configs/tiny.py"]).returncode == 2


@pytest.mark.parametrize("flags, message", [
    (["--num_processes", "2"], "--coordinator_address, --num_processes and --process_id go together"),
    (["--coordinator_address", "127.0.0.1:1", "--num_processes", "2", "--process_id", "2"],
     "--process_id 2: expected 0 <= process_id < --num_processes 2"),
])
def test_bad_multihost_flags_are_one_clear_line(tmp_path, flags, message):
    out = _run(["plan", "--config", "configs/tiny.py", "--workdir", str(tmp_path), *flags])
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(f"s2d: error: {message}")
    assert "Traceback" not in out.stderr


def test_convert_preset_writes_a_loadable_dir_and_refuses_to_overwrite(tmp_path):
    import s2d_jax

    assert main(["convert", "--config", "configs/tiny.py", "--workdir", str(tmp_path), "--config.pretrain.steps=0"]) == 0
    out = tmp_path / "converted"
    cfg = json.load(open(out / "config.json"))
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 64
    model = s2d_jax.load_model(out)
    tok = s2d_jax.load_tokenizer(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and model.cfg.num_layers == 2
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["convert", "--config", "configs/tiny.py", "--workdir", str(tmp_path), "--config.pretrain.steps=0"]) == 2
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
