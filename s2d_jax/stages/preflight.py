"""Before any work: every file a stage will read is resolved (data names fetched or found in the cache and
verified, hub ids downloaded, paths checked), so a missing file stops `s2d run` in its first seconds, not after
hours of rollouts."""

from __future__ import annotations

import os

import jax
from ml_collections import ConfigDict

from s2d_jax import datasets, trackers
from s2d_jax.errors import S2DError
from s2d_jax.model import hub
from s2d_jax.model.attention import unavailable
from s2d_jax.plan import estimate as plan
from s2d_jax.relegation import probe
from s2d_jax.relegation.rounds import in_rounds
from s2d_jax.system2.tasks import TASKS, tfds_source
from s2d_jax.system2.tasks.judge import PairwiseJudge
from s2d_jax.tokenizer import BYTES, SYLLABLES

# the stages that read data and the model (convert reads only the model; plan, pretrain and report neither)
READERS = ("route", "generate", "filter", "train", "eval", "run", "convert")
ROUND_STAGES = ("route", "generate", "filter", "train", "eval")  # with loop.rounds > 1, run by `s2d run` per round


def preflight(config: ConfigDict, stage: str, workdir: str = "") -> None:
    """Resolve what `stage` will read; one error naming the key for the first thing that is missing. First, the
    attention kernel a config names must run here (`s2d plan` checks its target's platform instead; this runs after
    `jax.distributed` is up, since asking for the backend starts it). `harness` (`s2d eval --harness`): its tasks
    and their data, and the models it scores in `workdir`."""
    if stage != "plan" and (why := unavailable(config.model.attention, jax.default_backend())):
        raise S2DError(f"config key 'model.attention': {why}")
    if stage != "plan":
        trackers.check(config)
    if stage == "harness":
        from s2d_jax.stages.harness import check

        check(config, workdir)
    if stage not in READERS:
        return
    if stage in ROUND_STAGES and in_rounds(config):
        key, what = ("loop.rounds", f"{config.loop.rounds} rounds") if config.loop.rounds > 1 else \
            ("loop.round_size", "rounds over a stream")
        raise S2DError(f"config key {key!r}: {what} run with `s2d run` (each in WORKDIR/rounds/R/); `s2d {stage}` "
                       f"alone runs in a one-round workdir")
    if stage != "convert":
        for key, value in data_keys(config):
            _check(key, value)
    if stage == "run" and in_rounds(config):
        from s2d_jax.stages.inputs import check_rounds

        check_rounds(config)
    m = config.model
    if m.path:
        local = hub.resolve(m.path, m.revision)
        if not os.path.exists(local):
            raise S2DError(f"config key 'model.path': {m.path}: no such file or directory (expected a Hugging Face "
                           f"model directory, a .gguf file or a hub id such as org/name)")
    if config.tokenizer and config.tokenizer not in (BYTES, SYLLABLES) and config.tokenizer != m.path:
        if not os.path.exists(hub.resolve(config.tokenizer, key="tokenizer")):
            raise S2DError(f"config key 'tokenizer': {config.tokenizer}: no such file or directory")
    t = config.teacher
    for key, value in (("teacher.path", t.path), ("teacher.tokenizer", t.tokenizer)):
        if value and value != BYTES and value != (t.path if key == "teacher.tokenizer" else None) and stage in (
                "generate", "filter", "eval", "run"):
            if not os.path.exists(hub.resolve(value, t.revision if value == t.path else "", key=key)):
                raise S2DError(f"config key {key!r}: {value}: no such file or directory (expected a Hugging Face "
                               f"model directory, a .gguf file or a hub id such as org/name)")
    r = config.route
    if probe.wanted(config) and r.probe_layer >= 0 and stage in ("route", "eval", "run"):
        layers = plan.model_config(config).num_layers
        if r.probe_layer > layers:
            raise S2DError(f"config key 'route.probe_layer': {r.probe_layer} is out of range (the model has "
                           f"{layers} layers: 0 = the embeddings .. {layers} = the last layer's output; -1 = chosen "
                           f"by validation)")
    plan.check_fits(config, stage)


def data_keys(config: ConfigDict) -> list[tuple[str, str]]:
    """(key, value) of every data file or directory the config names."""
    out = [(k, v) for k, v in (("task.path", config.task.path), ("eval.path", config.eval.path),
                                ("train.data", config.train.data)) if v and not v.startswith(tfds_source.PREFIX)]
    judging = [TASKS.get(name) for name in (config.task.name, config.eval.task)]
    if any(t is not None and issubclass(t, PairwiseJudge) for t in judging):
        out.append(("task.judge_prompts", config.task.judge_prompts))
    return out


def _check(key: str, value: str) -> None:
    try:
        local = datasets.resolve(value)
    except S2DError as e:
        raise S2DError(f"config key {key!r}: {e}") from None
    if not os.path.exists(local):
        raise S2DError(f"config key {key!r}: {value}: no such file or directory")
