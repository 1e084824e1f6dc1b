"""Experiment configs: Python files with `get_config()`, checked against one schema of defaults.

A config file returns an `ml_collections.ConfigDict` holding only what it changes; it is merged onto `defaults()`,
and so are command-line overrides (`--config.train.steps=100`). Every key must exist in the schema (else the error
names the closest valid key) and every value must have the schema's type (ml_collections checks it).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import traceback

from collections.abc import Callable

import ml_collections
from ml_collections import ConfigDict

from s2d_jax.config_rules import _
from s2d_jax.config_schema import schema
from s2d_jax.errors import S2DError


def defaults() -> ConfigDict:
    """Every key an experiment may set, with its default and so its type."""
    return ConfigDict(_strip(schema()))


# ------------------------------------------------------------------------------------------ rules


def _strip(tree: dict) -> dict:
    return {k: _strip(v) if isinstance(v, dict) else v.default if isinstance(v, _) else v for k, v in tree.items()}


def _rules(tree: dict, prefix: str = "") -> dict[str, Callable]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_rules(value, prefix + key + "."))
        elif isinstance(value, _):
            out[prefix + key] = value.check
    return out


def validate(config: ConfigDict, where: str = "config") -> None:
    """Every value against its rule, then the rules between keys; the error names the key, the value and what is
    allowed."""
    for key, check in _rules(schema()).items():
        value = _lookup(config, key, config, key)
        allowed = check(value)
        if allowed is not None:
            raise S2DError(f"{where}: key {key!r} = {value!r} is not allowed (expected {allowed})")
    for key, message in _cross_rules(config):
        raise S2DError(f"{where}: key {key!r}: {message}")


def _cross_rules(c: ConfigDict):
    """(key, what is wrong) for every rule that ties keys together."""
    from s2d_jax.model.config import PRESETS

    t = c.train
    if t.batch_size % t.grad_accum:
        yield "train.batch_size", f"{t.batch_size} is not a multiple of train.grad_accum={t.grad_accum}"
    if [c.mesh.data, c.mesh.fsdp, c.mesh.tensor].count(-1) > 1:
        yield "mesh", "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"
    if c.model.preset and c.model.preset not in PRESETS:
        yield "model.preset", f"{c.model.preset!r} is not a preset (presets: {', '.join(PRESETS)})"
    from s2d_jax.model import lora

    try:
        lora.check_targets(c.train.lora_targets)
    except S2DError as e:
        yield "train.lora_targets", str(e).split(": ", 1)[1]
    for key, name in (("task.name", c.task.name), ("eval.task", c.eval.task)):
        if name:
            from s2d_jax.system2.tasks import TASKS

            if name not in TASKS:
                yield key, f"{name!r} is not a task (tasks: {', '.join(sorted(TASKS))})"
    if c.program.name:
        from s2d_jax.system2.programs import PROGRAMS

        if c.program.name not in PROGRAMS:
            yield "program.name", f"{c.program.name!r} is not a program (programs: {', '.join(sorted(PROGRAMS))})"
    if c.generate.adaptive != "off" and c.filter.name != "majority":
        yield "generate.adaptive", f"{c.generate.adaptive!r} stops on a majority vote; filter.name is {c.filter.name!r}"
    if c.program.name and c.program.stage_tokens:
        from s2d_jax.system2.programs import PROGRAMS

        if c.program.name in PROGRAMS:
            try:
                PROGRAMS[c.program.name].budgets(per_stage=c.program.stage_tokens)
            except S2DError as e:
                yield "program.stage_tokens", str(e).split(": ", 1)[1]
    if c.eval.variants and (c.eval.task or c.task.name):
        from s2d_jax.system2.tasks import TASKS

        task = TASKS.get(c.eval.task or c.task.name)
        unknown = [v for v in c.eval.variants if task is not None and v not in task.VARIANTS]
        if unknown:
            known = ", ".join(task.VARIANTS) or "none"
            yield "eval.variants", f"{unknown[0]!r} is not a variant of task {task.name!r} (variants: {known})"
    yield from _loop_rules(c)
    context = _context(c)
    if context:
        for key in ("program.max_new_tokens", "eval.max_new_tokens", "train.max_len", "pretrain.max_len"):
            value = _lookup(c, key, c, key)
            if value >= context:
                yield key, f"{value} does not fit the model's context of {context} positions"


def _loop_rules(c: ConfigDict):
    """The rules of relegation's keys: route, loop, teacher, and the mixed-size pool it is shown on."""
    from s2d_jax.model.config import PRESETS

    for value in c.route.thresholds:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            yield "route.thresholds", f"{value!r} is not a threshold (expected numbers in [0, 1])"
            break
    r = c.route
    if "self" in c.eval.routers and r.method != "self":
        yield "eval.routers", "'self' reads the marker a model learns with route.method=self only"
    if r.method == "self" and "probe" in c.eval.routers:
        yield "eval.routers", ("'probe' trains on the held-out examples that route.method=self teaches the marker "
                               "on; compare the two in two runs")
    if r.method == "self" and not r.marker.strip():
        yield "route.marker", "an empty marker cannot be told from an answer (expected text such as '<think>')"
    from s2d_jax.relegation.rounds import in_rounds

    if in_rounds(c) and c.train.data:
        yield "train.data", "a loop of rounds trains on its rounds' kept examples; leave train.data empty"
    if c.teacher.preset and c.teacher.preset not in PRESETS:
        yield "teacher.preset", f"{c.teacher.preset!r} is not a preset (presets: {', '.join(PRESETS)})"
    if c.teacher.preset and not c.teacher.path and not c.teacher.tokenizer:
        yield "teacher.tokenizer", "a preset teacher needs a tokenizer (a path, a hub id or 'bytes')"
    if c.task.size_max and c.task.size_max < c.task.size:
        yield "task.size_max", f"{c.task.size_max} is below task.size={c.task.size} (0 = every input of task.size)"


def _context(c: ConfigDict) -> int | None:
    """The model's context length when the config names a model that says it (a preset, a readable checkpoint)."""
    from s2d_jax.model.config import PRESETS

    if c.model.path:  # a missing model is the stage's to report, where it is needed
        from s2d_jax.model import read_config

        return read_config(c.model.path).max_position_embeddings if os.path.exists(c.model.path) else None
    return PRESETS[c.model.preset].max_position_embeddings if c.model.preset in PRESETS else None


def _leaf_paths(c: ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for key, value in c.items():
        path = prefix + key
        out.extend(_leaf_paths(value, path + ".") if isinstance(value, ConfigDict) else [path])
    return out


def _unknown(key: str, schema: ConfigDict, where: str) -> S2DError:
    close = difflib.get_close_matches(key, _leaf_paths(schema) + list(schema.keys()), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return S2DError(f"{where}: unknown key {key!r}{hint}")


def _assign(c: ConfigDict, key: str, value, where: str, schema: ConfigDict) -> None:
    *parents, leaf = key.split(".")
    node = c
    for i, part in enumerate(parents):
        node = node.get(part) if isinstance(node, ConfigDict) else None
        if not isinstance(node, ConfigDict):
            raise _unknown(key, schema, where)
    if leaf not in node:
        raise _unknown(key, schema, where)
    old = node[leaf]
    if isinstance(old, ConfigDict):
        if not isinstance(value, (dict, ConfigDict)):
            raise S2DError(f"{where}: key {key!r} is a group; set its fields ({key}.…), not the group")
        for sub, v in value.items():
            _assign(c, f"{key}.{sub}", v, where, schema)
        return
    try:
        setattr(node, leaf, tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value)
    except TypeError:
        raise S2DError(f"{where}: key {key!r} expects {type(old).__name__}, got {value!r}") from None


def _parse(text: str, old):
    """Command-line text to the type of the value it replaces."""
    if isinstance(old, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        return text
    if isinstance(old, str):
        return text
    if isinstance(old, int):
        try:
            return int(text)
        except ValueError:
            return text
    if isinstance(old, float):
        try:
            return float(text)
        except ValueError:
            return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(old, tuple) and isinstance(value, str):  # a list on the command line: a,b,c ("" = none)
        return tuple(x.strip() for x in value.split(",") if x.strip())
    return value


def load_config_file(path: str) -> ConfigDict:
    """Run a config file's `get_config()`."""
    if not os.path.isfile(path):
        raise S2DError(f"{path}: no such config file")
    spec = importlib.util.spec_from_file_location(f"s2d_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise S2DError(f"{path}: line {e.lineno}: {e.msg}") from None
    except Exception as e:
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise S2DError(f"{path}: line {line}: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise S2DError(f"{path}: no get_config() function (a config file defines get_config() -> ConfigDict)")
    try:
        config = module.get_config()
    except Exception as e:
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise S2DError(f"{path}: line {line}: get_config() raised {type(e).__name__}: {e}") from None
    if not isinstance(config, (dict, ConfigDict)):
        raise S2DError(f"{path}: get_config() returned {type(config).__name__}, expected a ConfigDict")
    return ConfigDict(config) if isinstance(config, dict) else config


def load_config(path: str | None, overrides: list[str] = ()) -> ConfigDict:
    """The defaults, updated by the config file at `path` and then by `KEY=VALUE` overrides; locked."""
    schema = defaults()
    config = defaults()
    if path:
        for key, value in load_config_file(path).items():
            _assign(config, key, value.to_dict() if isinstance(value, ConfigDict) else value, path, schema)
    for item in overrides:
        if "=" not in item:
            raise S2DError(f"--config.{item}: expected --config.KEY=VALUE")
        key, text = item.split("=", 1)
        node_value = _lookup(config, key, schema, f"--config.{key}")
        _assign(config, key, _parse(text, node_value), f"--config.{item}", schema)
    config.lock()
    validate(config, path or "config")
    return config


def _lookup(config: ConfigDict, key: str, schema: ConfigDict, where: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            raise _unknown(key, schema, where)
        node = node[part]
    return node


def to_dict(config: ConfigDict) -> dict:
    return config.to_dict()


__all__ = ["defaults", "load_config", "load_config_file", "schema", "to_dict", "validate", "ml_collections"]


def teacher_config(config: ConfigDict) -> ConfigDict | None:
    """The config with the `teacher` as its model (weights and compute in `teacher.dtype`, its own tokenizer), or
    None without a teacher: what builds, plans and compiles the model that samples System 2."""
    t = config.teacher
    if not (t.path or t.preset):
        return None
    out = ConfigDict(config.to_dict())
    dtype = t.dtype or config.model.compute_dtype or config.model.dtype
    out.model.update(path=t.path, revision=t.revision, preset=t.preset, dtype=dtype, compute_dtype=dtype)
    out.tokenizer = t.tokenizer
    return out
