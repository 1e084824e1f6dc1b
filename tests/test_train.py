"""The trainer on configs/tiny.py: loss masking, packing, fitting, exact resume after SIGKILL, SIGTERM saves,
corrupt-checkpoint fallback, and 8 sharded devices against one."""

import json
import os
import random
import signal
import subprocess
import sys

import grain
import grain.experimental
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from s2d_jax.cli import main
from s2d_jax.config import load_config
from s2d_jax.errors import S2DError
from s2d_jax.model import PRESETS, init_model
from s2d_jax.build import build_mesh
from s2d_jax.system2.tasks import get_task
from s2d_jax.tokenizer import byte_tokenizer
from s2d_jax.train import Trainer
from s2d_jax.train import data as data_lib
from s2d_jax.train.trainer import loss_sums

TINY = ["--config", "configs/tiny.py", "--config.pretrain.steps=0"]  # the random tiny model


def _pairs(path, n=12, seed=5):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for e in get_task("last_letters").generate(n, seed=seed, num_words=3):
            f.write(json.dumps({"id": e.id, "prompt": e.input, "target": e.label}) + "\n")
    return str(path)


def _trainer(workdir, *overrides, mesh=None, model=None):
    config = load_config("configs/tiny.py", [f"train.data={_pairs(workdir / 'pairs.jsonl')}", *overrides])
    model = model or init_model(PRESETS["tiny"], seed=0, mesh=mesh)
    return Trainer(model, byte_tokenizer(), config, str(workdir), mesh=mesh)


def _batch(examples, max_len=160):
    rows = [data_lib._pad(e, max_len) for e in examples]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _params(workdir):
    return load_file(os.path.join(workdir, "model", "model.safetensors"))


# ------------------------------------------------------------------------------------------ data and loss


def test_encode_puts_weights_on_the_answer_and_its_end_token_only():
    tok = byte_tokenizer()
    ex = data_lib.encode(tok, "Take the last letters of \"Ab Cd\".", "bd")
    answer = ex["targets"][ex["weights"] == 1]
    assert tok.decode(answer[:-1]) == "bd" and answer[-1] == tok.eos_token_id
    assert (ex["inputs"][1:] == ex["targets"][:-1]).all()
    # the prompt part is exactly what the sampler feeds for a chat prompt
    from s2d_jax.tokenizer import chat_prompt
    head = tok(chat_prompt(tok, "Take the last letters of \"Ab Cd\"."), add_special_tokens=False).input_ids
    assert list(ex["inputs"][:len(head)]) == head and ex["weights"][:len(head) - 1].sum() == 0


def test_loss_sees_target_tokens_only():
    tok = byte_tokenizer()
    model = init_model(PRESETS["tiny"], seed=0)
    batch = _batch([data_lib.encode(tok, "Take the last letters of \"Ab Cd\".", "bd")])
    base, (_, count) = loss_sums(model, batch)
    assert count == 3  # "b", "d", end of turn
    prompt_pos = int(np.argmax(batch["weights"][0])) - 5
    target_pos = int(np.argmax(batch["weights"][0]))
    changed_prompt = {**batch, "targets": batch["targets"].copy()}
    changed_prompt["targets"][0, prompt_pos] = (changed_prompt["targets"][0, prompt_pos] + 1) % 256
    changed_target = {**batch, "targets": batch["targets"].copy()}
    changed_target["targets"][0, target_pos] = (changed_target["targets"][0, target_pos] + 1) % 256
    assert float(loss_sums(model, changed_prompt)[0]) == float(base)
    assert float(loss_sums(model, changed_target)[0]) != float(base)


def test_chunked_cross_entropy_equals_the_whole(tmp_path):
    """The loss in chunks of positions (never [B, T, vocab] logits) gives the same loss and gradients."""
    from s2d_jax.train.loss import cross_entropy

    rng = np.random.default_rng(0)
    hidden = jax.numpy.asarray(rng.normal(size=(3, 37, 16)), "float32")
    head = jax.numpy.asarray(rng.normal(size=(50, 16)), "float32")
    targets = rng.integers(0, 50, (3, 37))
    weights = (rng.random((3, 37)) > 0.3).astype(np.float32)
    whole = lambda h, w: cross_entropy(h, w, targets, weights, 0)
    for chunk in (8, 16, 37):
        chunked = lambda h, w: cross_entropy(h, w, targets, weights, chunk)
        np.testing.assert_allclose(chunked(hidden, head), whole(hidden, head), rtol=1e-6)
        grads = [jax.grad(lambda h, w, f=f: f(h, w)[0], (0, 1))(hidden, head) for f in (chunked, whole)]
        for a, b in zip(*grads):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert 0 < float(whole(hidden, head)[1]) <= weights.sum()


def test_packed_and_unpacked_rows_give_the_same_loss():
    tok = byte_tokenizer()
    model = init_model(PRESETS["tiny"], seed=0)
    examples = [data_lib.encode(tok, e.input, e.label) for e in get_task("last_letters").generate(6, num_words=2)]
    unpacked = loss_sums(model, _batch(examples, 160))
    packer = grain.experimental.FirstFitPackIterDataset(
        grain.MapDataset.source(examples).to_iter_dataset(), length_struct={k: 300 for k in data_lib.FIELDS},
        num_packing_bins=2, shuffle_bins=False)
    rows = [data_lib._from_packed(r) for r in packer]
    assert len(rows) < len(examples) and max(r["segment_ids"].max() for r in rows) > 1  # really packed
    packed = loss_sums(model, {k: np.stack([r[k] for r in rows]) for k in rows[0]})
    assert float(packed[1][1]) == float(unpacked[1][1])  # same target tokens
    np.testing.assert_allclose(float(packed[0]), float(unpacked[0]), rtol=2e-5)


def test_dataset_is_deterministic_and_resumable():
    tok = byte_tokenizer()
    examples = [data_lib.encode(tok, e.input, e.label) for e in get_task("last_letters").generate(10, num_words=2)]
    for pack in (False, True):
        it = iter(data_lib.dataset(examples, rows=4, max_len=128, seed=3, pack=pack))
        first = [next(it) for _ in range(3)]
        state = it.get_state()
        rest = [next(it) for _ in range(3)]
        again = iter(data_lib.dataset(examples, rows=4, max_len=128, seed=3, pack=pack))
        assert all((a["inputs"] == b["inputs"]).all() for a, b in zip(first, [next(again) for _ in range(3)]))
        again.set_state(state)
        assert all((a["inputs"] == b["inputs"]).all() for a, b in zip(rest, [next(again) for _ in range(3)]))


def test_bad_training_data(tmp_path):
    tok = byte_tokenizer()
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(S2DError, match=r"empty.jsonl: empty, expected a JSONL file"):
        data_lib.load_pairs(str(tmp_path / "empty.jsonl"), tok, max_len=64)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "target": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(S2DError, match=r"bad.jsonl: line 2: missing field 'target'"):
        data_lib.load_pairs(str(tmp_path / "bad.jsonl"), tok, max_len=64)
    (tmp_path / "long.jsonl").write_text('{"prompt": "a", "target": "b"}\n{"prompt": "' + "x" * 200 + '", "target": "b"}\n')
    assert data_lib.load_pairs(str(tmp_path / "long.jsonl"), tok, max_len=64).dropped == 1
    with pytest.raises(S2DError, match=r"long.jsonl: record 2: .* exceed train.max_len=64"):
        data_lib.load_pairs(str(tmp_path / "long.jsonl"), tok, max_len=64, too_long="error")


# ------------------------------------------------------------------------------------------ training


def test_fits_a_small_distill_set(tmp_path):
    trainer = _trainer(tmp_path, "train.steps=250", "train.learning_rate=5e-3", "train.batch_size=4",
                       "train.checkpoint_every=1000", "train.log_every=1", "train.end_lr_ratio=0.0")
    result = trainer.fit()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[0]["loss"] > 3 and result.metrics["loss"] < 0.05 and result.metrics["accuracy"] == 1.0
    assert {"loss", "accuracy", "learning_rate", "grad_norm", "tokens_per_s", "mfu"} <= set(rows[-1])


def test_accumulation_matches_one_big_batch(tmp_path):
    one = _trainer(tmp_path / "a", "train.steps=3", "train.batch_size=4", "train.grad_accum=1")
    two = _trainer(tmp_path / "b", "train.steps=3", "train.batch_size=4", "train.grad_accum=2")
    one.fit(), two.fit()
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_trainers_of_one_setting_share_the_step_program(tmp_path):
    """A run trains several times in one process (rounds, self-training, distillation): trainers of one model
    structure, optimizer setting and layout share the jitted step, so the second traces nothing, and trains bitwise
    as the first; another learning rate is another program."""
    from jax import monitoring

    traced = []
    listen = lambda event, _, fun_name="", **__: traced.append(fun_name) if event.endswith("jaxpr_trace_duration") else 0
    first = _trainer(tmp_path / "a", "train.steps=2", "train.batch_size=4")
    first.fit()
    monitoring.register_event_duration_secs_listener(listen)
    try:
        second = _trainer(tmp_path / "b", "train.steps=2", "train.batch_size=4")
        second.fit()
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert second._step is first._step and "train_step" not in traced
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = _trainer(tmp_path / "c", "train.steps=2", "train.batch_size=4", "train.learning_rate=1e-2")
    assert other._step is not first._step and other.tx is not first.tx


def test_eight_devices_match_one(tmp_path):
    assert jax.device_count() == 8
    config = load_config("configs/tiny.py", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    mesh = build_mesh(config)
    sharded = _trainer(tmp_path / "mesh", "train.steps=3", mesh=mesh)
    single = _trainer(tmp_path / "one", "train.steps=3")
    sharded.fit(), single.fit()
    qkv = sharded.params["layers"][0]["attn"]["qkv"]
    assert qkv.sharding.shard_shape(qkv.shape) == (32, 1, 4, 16)  # embed over fsdp, kv heads over tensor
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    mesh = build_mesh(load_config("configs/tiny.py", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]))
    sharded = _trainer(tmp_path, "train.steps=4", "train.checkpoint_every=2", mesh=mesh)
    sharded.fit()
    single = _trainer(tmp_path, "train.steps=4")  # same workdir: finds step 4 and has nothing left to do
    result = single.fit()
    assert result.resumed_from == 4 and result.step == 4
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
        assert len(b.sharding.device_set) == 1 and np.array_equal(np.asarray(a), np.asarray(b))


def test_bad_batch_configuration(tmp_path):
    with pytest.raises(S2DError, match=r"'train.batch_size': 6 is not a multiple of train.grad_accum=4"):
        _trainer(tmp_path, "train.batch_size=6", "train.grad_accum=4")


# ------------------------------------------------------------------------------------------ checkpoints


def _train_cli(workdir, *overrides):
    return main(["train", *TINY, "--workdir", str(workdir), f"--config.train.data={workdir / 'pairs.jsonl'}",
                 *overrides])


def _spawn(workdir, *overrides, fault=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # same XLA flags (8 devices) as this process: same kernels
    if fault:
        env["S2D_FAULT"] = fault  # s2d_jax/runtime/faults.py: a signal at a chosen step, never "too late"
    return subprocess.Popen([sys.executable, "-m", "s2d_jax.cli", "train", *TINY, "--workdir", str(workdir),
                             f"--config.train.data={workdir / 'pairs.jsonl'}", *overrides],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _logged_step(workdir) -> int:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


LONG = ["--config.train.steps=120", "--config.train.checkpoint_every=10", "--config.train.log_every=1",
        "--config.train.pack=true", "--config.train.batch_size=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    _pairs(workdir / "pairs.jsonl")
    assert _train_cli(workdir, *LONG, "--config.train.eval_every=60") == 0
    return workdir


def test_export_and_eval_hook(uninterrupted):
    from s2d_jax.model import load_model

    rows = [json.loads(line) for line in open(uninterrupted / "metrics.jsonl")]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [60, 120] and all(r["eval/n"] == 8 for r in evals)
    assert all(0 < r["eval/mean_tokens"] <= 8 for r in evals)
    model = load_model(str(uninterrupted / "model"))  # the export is a loadable HF directory
    assert model.cfg.num_layers == PRESETS["tiny"].num_layers


def test_resume_after_sigkill_is_exact(uninterrupted, tmp_path):
    _pairs(tmp_path / "pairs.jsonl")
    # Any step after 20: Orbax's save of step 20 first waits for step 10's, so a complete checkpoint exists
    # whatever the machine's speed (a kill at 12-19 may land while step 10's asynchronous save is still running).
    kill_at = random.Random().randint(21, 100)
    proc = _spawn(tmp_path, *LONG, fault=f"train-step:{kill_at}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert not (tmp_path / "model").exists() and _logged_step(tmp_path) == kill_at
    assert any(d.isdigit() for d in os.listdir(tmp_path / "checkpoints")), f"killed at step {kill_at}: no checkpoint"
    assert _train_cli(tmp_path, *LONG) == 0
    ours, ref = _params(tmp_path), _params(uninterrupted)
    assert ours.keys() == ref.keys()
    assert all(np.array_equal(ours[k], ref[k]) for k in ref), f"killed at step ~{kill_at}: parameters differ"
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, 121))  # every step logged once


def test_sigterm_saves_and_resumes(uninterrupted, tmp_path):
    _pairs(tmp_path / "pairs.jsonl")
    proc = _spawn(tmp_path, *LONG, fault="train-step:13:SIGTERM")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert not (tmp_path / "model").exists() and _logged_step(tmp_path) == 13
    saved = max(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved == _logged_step(tmp_path) and "checkpoint saved" in err
    assert _train_cli(tmp_path, *LONG) == 0
    ours, ref = _params(tmp_path), _params(uninterrupted)
    assert all(np.array_equal(ours[k], ref[k]) for k in ref)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path, caplog):
    import shutil

    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "model")
    os.remove(tmp_path / "config.json")  # a copy: its data path differs from the kept config's
    state = tmp_path / "checkpoints" / "120" / "state"
    for f in state.rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the array data blobs
            f.write_bytes(b"garbage")
    caplog.set_level("WARNING")
    assert _train_cli(tmp_path, *LONG) == 0
    assert "checkpoint" in caplog.text and "unreadable" in caplog.text
    assert any(d.startswith("120-") for d in os.listdir(str(tmp_path / "checkpoints") + ".corrupt"))
    ours, ref = _params(tmp_path), _params(uninterrupted)
    assert all(np.array_equal(ours[k], ref[k]) for k in ref)  # steps 111-120 retrained from checkpoint 110


def test_train_steps_may_grow_on_a_finished_workdir(tmp_path, capsys):
    """6 steps, then 10 on the same workdir, equals 10 in one run, bitwise (a constant schedule: the steps already
    taken had the learning rates a 10-step run gives them); the export and what was evaluated on it are retired and
    written again; shrinking is refused."""
    args = ["--config.train.schedule=constant", "--config.train.batch_size=2", "--config.train.log_every=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    for workdir in (one, two):
        workdir.mkdir()
        _pairs(workdir / "pairs.jsonl")
    assert _train_cli(one, *args, "--config.train.steps=10") == 0
    assert _train_cli(two, *args, "--config.train.steps=6") == 0
    (two / "eval.json").write_text("{}")  # as an eval of the 6-step model would have left it
    assert _train_cli(two, *args, "--config.train.steps=10") == 0
    ours, ref = _params(two), _params(one)
    assert ours.keys() == ref.keys() and all(np.array_equal(ours[k], ref[k]) for k in ref)
    assert [json.loads(line)["step"] for line in open(two / "metrics.jsonl")] == list(range(1, 11))
    assert json.load(open(two / "config.json"))["train"]["steps"] == 10 and not (two / "eval.json").exists()
    capsys.readouterr()
    assert _train_cli(two, *args, "--config.train.steps=8") == 2
    assert "train.steps may only grow on a workdir (10 there, 8 now)" in capsys.readouterr().err


def test_train_stage_errors(tmp_path, capsys):
    assert main(["train", *TINY, "--workdir", str(tmp_path)]) == 2
    assert "distill.jsonl: no such file (run `s2d filter` first" in capsys.readouterr().err
    assert main(["train", *TINY, "--workdir", str(tmp_path), "--config.train.schedule=cosin"]) == 2
