"""Bad input, as a new user gives it: on the command line, in config files and values, in model directories and
files, in data files and in workdirs. Every case must end with a non-zero exit and one line naming what was wrong
(never a traceback), and leave a complete workdir beside it unchanged byte for byte. In-process through
`s2d_jax.cli.main` (a subprocess per case would cost seconds of imports each)."""

import fcntl
import gzip
import json
import os
import shutil
import sys

import numpy as np
import pytest

from s2d_jax.cli import main

# The random tiny model (no pretraining), RaR 2-step with short stages: a complete workdir in seconds.
FAST = ["pretrain.steps=0", "program.name=rar2", "program.max_new_tokens=24", "task.size=3"]
TINY = ["--config", "configs/tiny.py", *(f"--config.{o}" for o in FAST)]


def _snapshot(root) -> dict:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """A workdir with complete rollouts, filter report and distillation set, and its bytes."""
    workdir = tmp_path_factory.mktemp("complete")
    for stage in ("generate", "filter"):
        assert main([stage, *TINY, "--workdir", str(workdir)]) == 0
    return workdir, _snapshot(workdir)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, complete):
    """Bad files of every kind, made once."""
    root = tmp_path_factory.mktemp("bad")
    w = lambda name, data: (root / name).write_bytes(data if isinstance(data, bytes) else data.encode()) or root / name

    # config files
    w("syntax.py", "def get_config(:\n")
    w("raises.py", "def get_config():\n    return {'train': {'steps': 1 / 0}}\n")
    w("no_get_config.py", "CONFIG = {}\n")
    w("returns_list.py", "def get_config():\n    return [1, 2]\n")
    w("unknown_key.py", "def get_config():\n    return {'train': {'stepz': 3}}\n")
    w("wrong_type.py", "def get_config():\n    return {'train': {'steps': 'many'}}\n")
    w("binary_config.py", b"\xff\xfe\x00def get_config()\x00\x81")
    # data files (prompt/target pairs)
    good = {"prompt": "List: a b", "target": "ab"}
    (root / "a_directory").mkdir()
    w("empty.jsonl", "")
    w("binary.jsonl", bytes(range(256)) * 4)
    w("malformed.jsonl", json.dumps(good) + "\n{\"prompt\": \"x\", \n")
    w("not_object.jsonl", json.dumps(good) + "\n[1, 2]\n")
    w("missing_field.jsonl", json.dumps({"prompt": "only a prompt"}) + "\n")
    w("wrong_type.jsonl", json.dumps({"prompt": 3, "target": "ab"}) + "\n")
    w("truncated.jsonl.gz", gzip.compress((json.dumps(good) + "\n").encode() * 50)[:40])
    w("too_long.jsonl", json.dumps({"prompt": "word " * 400, "target": "x"}) + "\n")
    # model directories and files
    from s2d_jax.model import PRESETS, init_model, save_hf

    model_dir = root / "model"
    save_hf(init_model(PRESETS["tiny"]), model_dir)

    def variant(name, edit):
        d = root / name
        shutil.copytree(model_dir, d)
        edit(d)
        return d

    variant("no_config", lambda d: os.remove(d / "config.json"))
    variant("pickle_only", lambda d: (os.remove(d / "model.safetensors"), (d / "pytorch_model.bin").write_bytes(b"x")))
    variant("corrupt", lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!"))
    whole = (model_dir / "model.safetensors").read_bytes()
    variant("truncated", lambda d: (d / "model.safetensors").write_bytes(whole[:5000]))
    variant("bad_json", lambda d: (d / "config.json").write_text("{\"model_type\": "))
    variant("unsupported", lambda d: _edit_config(d, model_type="gpt_neox"))
    variant("wrong_shape", lambda d: _edit_config(d, hidden_size=96))
    variant("missing_tensor", lambda d: _drop_tensor(d, "model.norm.weight"))
    w("garbage.gguf", b"GGUF" + bytes(100))
    w("weights.bin", b"\x80\x02}q\x00.")
    return root


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _drop_tensor(d, name):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    del tensors[name]
    save_file(tensors, d / "model.safetensors")


# (case, argv after the stage, what the line must say). {bad}, {w} (a fresh workdir), {complete} are filled in.
CLI = [
    ("unknown stage", ["nostage", *TINY], "invalid choice: 'nostage'"),
    ("no config", ["generate"], "the following arguments are required: --config"),
    ("unknown flag", ["generate", *TINY, "--fast"], "unrecognized arguments: --fast"),
    ("unknown key", ["generate", *TINY, "--config.nokey=1"], "unknown key 'nokey'"),
    ("misspelt key", ["generate", *TINY, "--config.train.stepz=1"], "did you mean 'train.steps'"),
    ("wrong type", ["generate", *TINY, "--config.train.steps=abc"], "key 'train.steps' expects int"),
    ("a group", ["generate", *TINY, "--config.train=3"], "key 'train' is a group"),
    ("no value", ["generate", *TINY, "--config.train.steps"], "expected --config.KEY=VALUE"),
    ("bad process count", ["generate", *TINY, "--num_processes", "two"], "invalid int value: 'two'"),
]
CONFIG_FILES = [
    ("missing file", ["generate", "--config", "{bad}/nothing.py"], "nothing.py: no such config file"),
    ("syntax error", ["generate", "--config", "{bad}/syntax.py"], "syntax.py: line 1"),
    ("get_config raises", ["generate", "--config", "{bad}/raises.py"],
     "raises.py: line 2: get_config() raised ZeroDivisionError"),
    ("no get_config", ["generate", "--config", "{bad}/no_get_config.py"], "no get_config() function"),
    ("returns a list", ["generate", "--config", "{bad}/returns_list.py"], "get_config() returned list"),
    ("unknown key in file", ["generate", "--config", "{bad}/unknown_key.py"], "unknown key 'train.stepz'"),
    ("wrong type in file", ["generate", "--config", "{bad}/wrong_type.py"], "key 'train.steps' expects int"),
    ("binary config file", ["generate", "--config", "{bad}/binary_config.py"], "binary_config.py: line"),
]
VALUES = [(f"{key}={value}", ["generate", *TINY, f"--config.{key}={value}"], says) for key, value, says in [
    ("train.learning_rate", "-0.1", "key 'train.learning_rate' = -0.1 is not allowed (expected > 0.0)"),
    ("generate.samples", "0", "key 'generate.samples' = 0 is not allowed (expected >= 1)"),
    ("generate.top_p", "0", "key 'generate.top_p' = 0.0 is not allowed (expected (0.0, 1.0])"),
    ("generate.top_p", "1.5", "key 'generate.top_p' = 1.5"),
    ("generate.temperature", "-1", "key 'generate.temperature' = -1.0"),
    ("generate.top_k", "-3", "key 'generate.top_k' = -3"),
    ("generate.max_batch", "0", "key 'generate.max_batch' = 0"),
    ("generate.chunk", "0", "key 'generate.chunk' = 0"),
    ("filter.min_share", "1.5", "key 'filter.min_share' = 1.5 is not allowed (expected [0.0, 1.0])"),
    ("filter.name", "best", "key 'filter.name' = 'best' is not allowed (expected one of 'majority'"),
    ("task.name", "chess", "key 'task.name': 'chess' is not a task"),
    ("task.size", "0", "key 'task.size' = 0"),
    ("program.name", "think", "key 'program.name': 'think' is not a program"),
    ("program.max_new_tokens", "5000", "key 'program.max_new_tokens': 5000 does not fit the model's context"),
    ("train.steps", "0", "key 'train.steps' = 0"),
    ("train.batch_size", "0", "key 'train.batch_size' = 0"),
    ("train.grad_accum", "3", "key 'train.batch_size': 4 is not a multiple of train.grad_accum=3"),
    ("train.too_long", "truncate",
     "key 'train.too_long' = 'truncate' is not allowed (expected one of 'drop', 'error')"),
    ("train.schedule", "step", "key 'train.schedule' = 'step'"),
    ("train.b2", "1.0", "key 'train.b2' = 1.0 is not allowed (expected [0.0, 1.0))"),
    ("train.remat", "some", "key 'train.remat' = 'some'"),
    ("train.lora_rank", "-1", "key 'train.lora_rank' = -1"),
    ("train.lora_alpha", "0", "key 'train.lora_alpha' = 0.0"),
    ("train.lora_targets", "('q_proj', 'wq')", "'wq' is not a LoRA target"),
    ("train.max_len", "4096", "key 'train.max_len': 4096 does not fit the model's context of 1024 positions"),
    ("train.keep_checkpoints", "0", "key 'train.keep_checkpoints' = 0"),
    ("train.warmup_steps", "-1", "key 'train.warmup_steps' = -1"),
    ("mesh.data", "0", "key 'mesh.data' = 0 is not allowed (expected -1 (all remaining devices) or >= 1)"),
    ("model.dtype", "int8", "key 'model.dtype' = 'int8'"),
    ("model.attention", "flash", "key 'model.attention' = 'flash'"),
    ("model.attention", "cudnn", "key 'model.attention': 'cudnn' runs on gpu, not on this run's cpu; 'auto' picks"),
    ("model.preset", "gpt5", "key 'model.preset': 'gpt5' is not a preset"),
    ("eval.samples", "0", "key 'eval.samples' = 0"),
    ("eval.max_new_tokens", "-1", "key 'eval.max_new_tokens' = -1"),
    ("eval.variants", "('upside_down',)", "key 'eval.variants': 'upside_down' is not a variant of task "
                                          "'last_letters' (variants: none)"),
    ("program.stage_tokens", "answer=lots", "key 'program.stage_tokens': 'answer=lots' is not STAGE=TOKENS"),
    ("filter.target", "reasoning", "key 'filter.target' = 'reasoning'"),
    ("task.words", "emoji", "key 'task.words' = 'emoji'"),
    ("plan.device_gb", "0", "key 'plan.device_gb' = 0.0"),
    ("seed", "-1", "key 'seed' = -1"),
    ("report.trackers", "tensorboard,neptune", "key 'report.trackers' = ('tensorboard', 'neptune') is not allowed "
                                               "(expected a tuple of distinct names among 'tensorboard', 'wandb')"),
    ("report.wandb.mode", "cloud", "key 'report.wandb.mode' = 'cloud' is not allowed (expected one of 'online', "
                                   "'offline', 'disabled')"),
]] + [("two -1 mesh axes", ["generate", *TINY, "--config.mesh.data=-1", "--config.mesh.fsdp=-1"],
       "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")]
CONVERT = ["convert", *TINY, "--config.tokenizer=bytes", "--workdir", "{w}"]
MODELS = [(case, [*CONVERT, f"--config.model.path={{bad}}/{name}"], says) for case, name, says in [
    ("missing model", "no_model", "no_model: no such file or directory"),
    ("no config.json", "no_config", "no_config: no config.json"),
    ("pickle only", "pickle_only", "only pickle weights (pytorch_model.bin)"),
    ("corrupt safetensors", "corrupt", "not a readable safetensors file"),
    ("truncated safetensors", "truncated", "not a readable safetensors file"),
    ("config.json not JSON", "bad_json", "config.json: line 1: not valid JSON"),
    ("unsupported family", "unsupported", "model_type 'gpt_neox' is not supported"),
    ("wrong shapes", "wrong_shape", "expected (264, 96) from the model config"),
    ("missing tensor", "missing_tensor", "missing tensor 'model.norm.weight'"),
    ("garbage GGUF", "garbage.gguf", "garbage.gguf: not a readable GGUF file"),
    ("not a model file", "weights.bin", "weights.bin: not a model"),
]]
TRAIN = ["train", *TINY, "--workdir", "{w}"]
DATA = [(case, [*TRAIN, f"--config.train.data={{bad}}/{name}", *extra], says) for case, name, extra, says in [
    ("missing data", "none.jsonl", [], "none.jsonl: no such file"),
    ("data is a directory", "a_directory", [], "a_directory: is a directory"),
    ("empty data", "empty.jsonl", [], "empty.jsonl: empty, expected a JSONL file"),
    ("binary data", "binary.jsonl", [], "binary.jsonl: line 1: not UTF-8 text"),
    ("malformed line", "malformed.jsonl", [], "malformed.jsonl: line 2: not valid JSON"),
    ("not an object", "not_object.jsonl", [], "not_object.jsonl: line 2: expected a JSON object, got list"),
    ("missing field", "missing_field.jsonl", [], "missing_field.jsonl: line 1: missing field 'target'"),
    ("wrong field type", "wrong_type.jsonl", [], "wrong_type.jsonl: line 1: field 'prompt' must be a string, got int"),
    ("truncated gzip", "truncated.jsonl.gz", [], "truncated.jsonl.gz: truncated"),
    ("too long", "too_long.jsonl", ["--config.train.too_long=error"], "exceed train.max_len=160"),
]]
WORKDIRS = [
    ("workdir is a file", ["generate", *TINY, "--workdir", "{bad}/empty.jsonl"], "exists and is not a directory"),
    ("workdir under a file", ["generate", *TINY, "--workdir", "{bad}/empty.jsonl/sub"], "cannot create the workdir"),
    ("kept config differs", ["train", *TINY, "--workdir", "{complete}", "--config.train.learning_rate=0.5"],
     "this workdir was made with a different config (key 'train.learning_rate': 0.003 there, 0.5 now)"),
    ("train.steps shrinks", ["train", *TINY, "--workdir", "{complete}", "--config.train.steps=11"],
     "train.steps may only grow on a workdir (12 there, 11 now); use another --workdir to train fewer steps"),
    ("kept config differs in a stage's key", ["generate", *TINY, "--workdir", "{complete}", "--config.seed=1"],
     "(key 'seed': 0 there, 1 now); use another --workdir"),
]
GENERATION_MESH = [(case, ["generate", *TINY, *(f"--config.generate.mesh.{o}" for o in values)], says)
                   for case, values, says in [
    ("generation mesh over too many devices", ["data=4", "fsdp=1", "tensor=4"],
     "config key 'generate.mesh': mesh {'data': 4, 'fsdp': 1, 'tensor': 4} needs 16 devices, but 8 are available"),
    ("generation mesh splitting 2 kv heads 8 ways", ["data=1", "fsdp=1", "tensor=8"],
     "config key 'generate.mesh.tensor': 8 does not divide the sampling model's heads and kv heads (2, 4); would "
     "work: 1, 2"),
    ("generation mesh half set", ["tensor=2"], "set all three axes (-1 or >= 1), or leave all three 0"),
    ("generation mesh axis below -1", ["data=-2"], "key 'generate.mesh.data' = -2 is not allowed"),
]]
HARNESS = [
    ("unknown harness task", ["eval", *TINY, "--harness", "gsm9k", "--config.eval.harness.systems=system1"],
     "config key 'eval.harness.tasks': no harness task 'gsm9k' (close: gsm8k"),
    ("harness task whose data is not here", ["eval", *TINY, "--harness", "arc_easy",
                                             "--config.eval.harness.systems=system1"],
     "config key 'eval.harness.tasks': harness task 'arc_easy': its data cannot be read here"),
    ("harness on the distilled model before training", ["eval", *TINY, "--harness", "gsm8k"],
     "/w/model: no distilled model (run `s2d train` first"),
    ("harness with another stage", ["generate", *TINY, "--harness", "gsm8k"],
     "--harness goes with the eval stage: s2d eval --harness TASKS"),
    ("harness include_path missing", ["eval", *TINY, "--harness", "mine", "--config.eval.harness.include_path={bad}/no",
                                      "--config.eval.harness.systems=system1"],
     "config key 'eval.harness.include_path': "),
]
KERNELS = [("a TPU kernel planned for a GPU", ["plan", *TINY, "--config.plan.topology=h100-80gb",
                                              "--config.model.attention=ragged", "--workdir", "{w}"],
            "config key 'model.attention': 'ragged' runs on tpu, cpu, not on this run's gpu; 'auto' picks the "
            "fastest path there (plan.topology=h100-80gb)")]
CASES = CLI + CONFIG_FILES + VALUES + MODELS + DATA + WORKDIRS + GENERATION_MESH + KERNELS + HARNESS


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60


def _check(argv, says, capsys, complete, tmp_path, bad):
    workdir, before = complete
    fill = dict(bad=bad, w=tmp_path / "w", complete=workdir)
    argv = [a.format(**fill) for a in argv]
    if "--workdir" not in argv and argv and argv[0] != "nostage":
        argv += ["--workdir", str(tmp_path / "w")]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("s2d:")]
    assert code != 0, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert says in lines[0], lines[0]
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("argv,says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(argv, says, capsys, complete, tmp_path, bad):
    _check(argv, says, capsys, complete, tmp_path, bad)


def test_a_refused_command_writes_nothing_anywhere(capsys, tmp_path):
    """A misspelt data name in a new workdir (under a new parent): refused, and neither directory is left behind,
    so the corrected command is not refused as "a different config"."""
    fresh = tmp_path / "runs" / "w"
    assert main(["generate", *TINY, "--workdir", str(fresh), "--config.task.path=data:last_leters"]) == 2
    assert "no data named 'last_leters'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    fresh.mkdir(parents=True)  # an empty workdir the user made: kept, and still empty
    assert main(["generate", *TINY, "--workdir", str(fresh), "--config.task.path=data:last_leters"]) == 2
    assert fresh.is_dir() and sorted(os.listdir(fresh)) in ([], [".s2d.lock"])


def test_wandb_asked_for_without_the_package_is_one_line(capsys, complete, tmp_path, bad, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed: `import wandb` fails
    _check(["generate", *TINY, "--config.report.trackers=wandb"], "config key 'report.trackers': 'wandb' needs "
           "the wandb package", capsys, complete, tmp_path, bad)
    assert not (tmp_path / "w").exists()


def test_a_workdir_in_use_is_refused_naming_its_holder(capsys, complete, tmp_path, bad):
    workdir = tmp_path / "busy"
    workdir.mkdir()
    with open(workdir / ".s2d.lock", "w") as held:  # as a running s2d holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("s2d pid 4242 on host elsewhere")
        held.flush()
        _check(["generate", *TINY, "--workdir", str(workdir)], "in use by s2d pid 4242 on host elsewhere", capsys,
               complete, tmp_path, bad)
    assert not (workdir / "rollouts.jsonl").exists() and not (workdir / "config.json").exists()


def test_a_corrupt_kept_config_is_one_line(capsys, complete, tmp_path, bad):
    copy = tmp_path / "copy"
    shutil.copytree(complete[0], copy)
    (copy / "config.json").write_text("{ not json")
    _check(["train", *TINY, "--workdir", str(copy)], "the workdir's kept config is not valid JSON", capsys,
           complete, tmp_path, bad)


def test_free_keys_may_change_in_a_complete_workdir(complete, tmp_path):
    """Layout, batching on device, logging and checkpoint cadence do not change results: a rerun with other values
    is allowed (and finds its artifacts complete)."""
    copy = tmp_path / "copy"
    shutil.copytree(complete[0], copy)
    assert main(["generate", *TINY, "--workdir", str(copy), "--config.generate.max_batch=7",
                 "--config.generate.chunk=1", "--config.mesh.data=2", "--config.train.log_every=3"]) == 0
    assert _snapshot(copy)["rollouts.jsonl"] == complete[1]["rollouts.jsonl"]


def test_an_unexpected_error_is_one_line_with_its_traceback_in_the_workdir(capsys, tmp_path, monkeypatch):
    from s2d_jax import stages

    def broken(config, workdir):
        raise np.linalg.LinAlgError("a bug")

    monkeypatch.setitem(stages.STAGES, "filter", broken)
    assert main(["filter", *TINY, "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"s2d: internal error: LinAlgError: a bug; details in "
                                            f"{tmp_path / 's2d-error.log'}")
    assert "Traceback" not in err and "a bug" in (tmp_path / "s2d-error.log").read_text()
    with pytest.raises(np.linalg.LinAlgError):  # --debug shows the traceback
        main(["filter", *TINY, "--workdir", str(tmp_path), "--debug"])
