"""Multi-host on localhost: two `s2d` processes with 4 fake CPU devices each form one 8-device cluster through
`jax.distributed` (gloo collectives), and must give what one process with 8 devices gives."""

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from s2d_jax.cli import main
from s2d_jax.config import load_config
from s2d_jax.stages.generate import read_rollouts

from conftest import REPO, xla_flags

TIMEOUT = 600  # seconds for one multi-process stage (a hang guard, no timing): a hung cluster fails the test
MESH = ["mesh.data=4", "mesh.tensor=2"]
GENERATE = ["pretrain.steps=0", "program.name=rar2", "program.max_new_tokens=16", "task.size=3", "task.n=6",
            "generate.samples=3", "generate.chunk=4", *MESH]
TRAIN = ["pretrain.steps=0", "train.batch_size=8", "train.max_len=96", "train.checkpoint_every=3",
         "train.log_every=1", *MESH]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster(stage: str, workdir, overrides: list[str], processes: int = 2, devices: int = 4,
             faults: dict | None = None, expect: int | None = 0) -> list[tuple[int, str]]:
    """Run `s2d STAGE` as `processes` local processes of one cluster and wait for all of them; `faults` gives a
    process an S2D_FAULT (s2d_jax/runtime/faults.py). Returns each process's (exit status, output)."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices),
           "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "s2d_jax.cli", stage, "--config", "configs/tiny.py", "--workdir", str(workdir),
            *(f"--config.{o}" for o in overrides), "--coordinator_address", f"127.0.0.1:{port}",
            "--num_processes", str(processes)]
    procs = [subprocess.Popen([*args, "--process_id", str(i)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**env, **({"S2D_FAULT": faults[i]} if faults and i in faults else {})})
             for i in range(processes)]
    # read every process's output at once: a host whose pipe nobody reads would block on a full pipe, and the cluster
    # with it
    with concurrent.futures.ThreadPoolExecutor(processes) as pool:
        reads = [pool.submit(p.communicate, timeout=TIMEOUT) for p in procs]
        try:
            outputs = [r.result()[0] for r in reads]
        finally:
            for p in procs:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert expect is None or p.returncode == expect, \
            f"process {i} of `s2d {stage}` exited {p.returncode}:\n{out[-3000:]}"
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def _pairs(path) -> str:
    rows = [{"prompt": f"Say {w} twice.", "target": f"{w} {w}"} for w in
            ("kalo", "mire", "tosu", "pumi", "dena", "rovi", "sabe", "lumo", "teka", "nibu", "fola", "gisu")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _params(workdir) -> dict[str, np.ndarray]:
    return load_file(os.path.join(workdir, "model", "model.safetensors"))


def test_shard_merge_refuses_missing_and_repeated_records(tmp_path):
    config = load_config("configs/tiny.py", GENERATE)
    rows = [{"id": f"last_letters-s0-w3:{i}", "sample": j, "input": "q", "answer": "ab"} for i in range(6)
            for j in range(3)]
    for p in range(2):
        (tmp_path / f"rollouts-{p:05d}-of-00002.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows if int(r["id"].split(":")[1]) % 2 == p))
    merged = read_rollouts(config, str(tmp_path))
    assert [(r["id"], r["sample"]) for r in merged] == [(r["id"], r["sample"]) for r in rows]
    shard = tmp_path / "rollouts-00001-of-00002.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:-1]))
    with pytest.raises(Exception, match="has 2 of its 3 samples"):
        read_rollouts(config, str(tmp_path))
    shard.write_text("".join(lines + lines[:1]))
    with pytest.raises(Exception, match="is repeated"):
        read_rollouts(config, str(tmp_path))
    shard.unlink()
    with pytest.raises(Exception, match="rollouts-00001-of-00002.jsonl"):
        read_rollouts(config, str(tmp_path))


def _params_initial(tmp_path, data) -> np.ndarray:
    """The untrained embedding (the random preset the runs start from), to show training moved it."""
    from s2d_jax.model import PRESETS, init_model

    config = load_config("configs/tiny.py", [*TRAIN, f"train.data={data}"])
    model = init_model(PRESETS[config.model.preset], seed=config.seed)
    return np.asarray(model.embed[...])


def test_two_hosts_run_the_whole_loop_like_one(tmp_path):
    """`s2d run` (pretrain, generate, filter, train, eval) on the 2-process cluster: the same rollouts, distillation
    set and evaluation as one process with 8 devices; trained parameters agree to float rounding (the cross-process
    all-reduce sums in another order)."""
    overrides = [*MESH, "pretrain.steps=20"]  # (enough for answer-shaped samples that the filter keeps some of)
    _cluster("run", tmp_path / "two", overrides)
    assert main(["run", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "one"),
                 *(f"--config.{o}" for o in overrides)]) == 0
    config = load_config("configs/tiny.py", overrides)
    assert read_rollouts(config, str(tmp_path / "two")) == read_rollouts(config, str(tmp_path / "one"))
    assert (tmp_path / "two" / "distill.jsonl").read_text() == (tmp_path / "one" / "distill.jsonl").read_text()
    assert (tmp_path / "two" / "distill.jsonl").read_text().strip()  # the filter kept some: the train stage trains
    two, one = (json.load(open(tmp_path / d / "eval.json")) for d in ("two", "one"))
    for system in ("system1", "system2", "distilled"):
        assert {k: v for k, v in two[system].items() if k not in ("seconds", "seconds_total")} == \
            {k: v for k, v in one[system].items() if k not in ("seconds", "seconds_total")}
    assert two["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=1e-5)
    trained = _params(tmp_path / "two")
    for k, v in _params(tmp_path / "one").items():
        np.testing.assert_allclose(trained[k], v, rtol=0, atol=1e-4, err_msg=k)


# ------------------------------------------------------------------------------------------ a lost host

LOST = ["cluster.heartbeat_timeout_s=10"]


def _survivor_says_host_1_was_lost(results) -> None:
    (code, out), (dead, _) = results
    assert dead == 128 + 9  # host 1's worker was SIGKILLed (its supervisor says so)
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 75 and lines[-1].startswith("s2d: error: host 1 of the cluster was lost (no heartbeat); this "
                                               "host stopped; complete artifacts are kept: rerun the same command "
                                               "on all hosts to resume"), out[-3000:]
    assert "Check failure" not in out and "@     0x" not in out and "Traceback" not in out
    assert sum(line.startswith("s2d:") for line in lines) == 1


def test_two_hosts_generate_the_rollouts_of_one_through_a_lost_host_and_a_torn_shard(tmp_path):
    """Host 1's worker is killed after its first chunk of rollouts; host 0 stops within the heartbeat timeout with
    one line naming host 1 and no native dump; both rerun and end with the one-process rollouts, each host's shard
    holding its own inputs; the filter merges the shards into the one-process distillation set; a shard torn by a
    kill is finished by the next run."""
    two = tmp_path / "two"
    # the generate stage's warm-up on a cluster, through a lost host and a torn shard (configs/tiny.py has none)
    overrides = [*GENERATE, *LOST, "task.n=12", "generate.chunk=2", "compile.warmup=true"]
    _survivor_says_host_1_was_lost(_cluster("generate", two, overrides, faults={1: "rollout-chunk:1"}, expect=None))
    assert "heartbeat" in (two / "s2d-error.log").read_text()  # the details, kept
    _cluster("generate", two, overrides)
    shards = sorted(f.name for f in two.iterdir() if f.name.startswith("rollouts"))
    assert shards == ["rollouts-00000-of-00002.jsonl", "rollouts-00001-of-00002.jsonl"]
    assert main(["generate", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "one"),
                 *(f"--config.{o}" for o in overrides)]) == 0
    config = load_config("configs/tiny.py", overrides)
    single = read_rollouts(config, str(tmp_path / "one"))
    assert len(single) == 12 * 3
    assert read_rollouts(config, str(two)) == single  # same ids, samples, texts, answers and order
    # each host wrote its own inputs: no record in both shards, none missing
    ids = [{json.loads(line)["id"] for line in (two / s).read_text().splitlines()} for s in shards]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 12
    for workdir in ("two", "one"):
        assert main(["filter", "--config", "configs/tiny.py", "--workdir", str(tmp_path / workdir),
                     *(f"--config.{o}" for o in overrides)]) == 0
    assert (two / "distill.jsonl").read_text() == (tmp_path / "one" / "distill.jsonl").read_text()
    # a kill that left host 1's shard unfinished: the rerun agrees over both hosts on what is missing, and host 0,
    # complete, still joins the sampler's collectives; the merge is again the one-host file
    shard = two / shards[1]
    lines = shard.read_text().splitlines(keepends=True)
    (two / (shards[1] + ".partial")).write_text("".join(lines[:-4]) + lines[-4][:20])  # torn line
    shard.unlink()
    (two / "distill.jsonl").unlink()
    _cluster("generate", two, overrides)
    assert shard.read_text() == "".join(lines)
    assert read_rollouts(config, str(two)) == single


def test_two_hosts_train_like_one_a_lost_host_resumes_bitwise_and_on_one(tmp_path):
    """Host 1 is killed in step 4: host 0 stops in one line, nothing final is written; the rerun on both hosts ends
    bitwise where an uninterrupted 2-host run ends; the 2-host checkpoint of step 3 resumes in one process with 8
    devices to the same parameters, to float rounding."""
    data = _pairs(tmp_path / "pairs.jsonl")
    overrides = [*TRAIN, *LOST, f"train.data={data}", "train.steps=6", "train.checkpoint_every=1"]
    killed = tmp_path / "killed"
    _survivor_says_host_1_was_lost(_cluster("train", killed, overrides, faults={1: "train-step:4"}, expect=None))
    assert not (killed / "model").exists()
    shutil.copytree(killed, tmp_path / "on_one")
    _cluster("train", killed, overrides)
    _cluster("train", tmp_path / "straight", overrides)
    resumed, straight = _params(killed), _params(tmp_path / "straight")
    assert resumed.keys() == straight.keys() and all(np.array_equal(resumed[k], straight[k]) for k in straight)
    assert not np.allclose(straight["model.embed_tokens.weight"], _params_initial(tmp_path, data))
    # one process from the 2-host checkpoint: steps 4-6 on one process give the 2-host parameters (the whole-loop
    # test trains one process from scratch beside the cluster)
    assert main(["train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "on_one"),
                 *(f"--config.{o}" for o in overrides)]) == 0
    params = _params(tmp_path / "on_one")
    assert params.keys() == straight.keys()
    for k in straight:
        np.testing.assert_allclose(params[k], straight[k], rtol=0, atol=1e-6, err_msg=k)
    metrics = [json.loads(line) for line in (tmp_path / "on_one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # steps 4-6 appended to the 2-host run's 1-3
