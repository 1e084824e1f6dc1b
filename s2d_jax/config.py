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

import ml_collections
from ml_collections import ConfigDict

from s2d_jax.errors import S2DError


def defaults() -> ConfigDict:
    """The schema: every key an experiment may set, with its default and so its type."""
    return ConfigDict({
        "seed": 0,
        "model": {
            "path": "",  # HF directory or .gguf file; "" = random init of `preset`
            "preset": "",  # a name in s2d_jax.model.PRESETS, used when `path` is ""
            "dtype": "float32",  # master parameter dtype of full fine-tuning (float32: bf16 rounds updates away)
            "compute_dtype": "",  # "" = same as dtype; sampling, eval and LoRA's frozen base hold weights in it
            "scan_layers": False,  # stack the layers and run them under lax.scan (compile time flat in depth)
            "attention": "auto",  # auto | reference | blockwise | cudnn | splash (s2d_jax/model/attention.py)
        },
        "tokenizer": "",  # "" = model.path; "bytes" = the built-in byte tokenizer
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "convert": {"output": ""},  # "" = WORKDIR/converted
        "task": {
            "name": "",  # s2d_jax.system2.tasks.TASKS
            "path": "",  # the unlabelled input pool; "" = generate `n` examples (synthetic tasks)
            "n": 0,  # how many inputs to use (0 = all in `path`)
            "offset": 0,  # skip this many inputs of `path` first (keep the eval split apart)
            "size": 4,  # synthetic tasks: words (last letters) or people (coin flip) per input
            "seed": 0,  # synthetic tasks: generator seed
            "tfds_data_dir": "",  # with path "tfds:NAME[/CONFIG][:SPLIT]": where the prepared dataset lives
            "input_field": "question",  # TFDS records: the input field (dotted for nested)
            "label_field": "",  # TFDS records: the label field ("" = the task's default)
        },
        "program": {"name": "", "chat": True, "max_new_tokens": 0},  # PROGRAMS; 0 = each stage's own budget
        "generate": {
            "samples": 8,  # System 2 samples per input (N)
            "temperature": 0.7,
            "top_k": 0,  # 0 = off
            "top_p": 1.0,  # 1.0 = off
            "max_batch": 32,  # sequences per device batch
            "chunk": 64,  # inputs per rollout chunk written to disk (the resume granularity)
        },
        "filter": {"name": "majority", "min_share": 0.5},  # majority (vote over answers)
        "pretrain": {  # toy base models only (the CPU demo): random `model.preset` -> WORKDIR/base
            "steps": 0,  # 0 = no pretraining: the model is `model.path` (or a random preset)
            "corpus_size": 4000,  # synthetic prompt/target pairs (the task's `corpus`)
            "cot_max_words": 6,  # step-by-step answers for lists of 1..this many words
            "direct_max_words": 2,  # direct answers only for lists of 1..this many words
            "direct_share": 0.3,
            "batch_size": 16,
            "learning_rate": 1e-3,
            "warmup_steps": 50,
            "max_len": 384,
            "pack": True,
            "seed": 0,
        },
        "train": {
            "data": "",  # prompt/target JSONL; "" = WORKDIR/distill.jsonl
            "steps": 100,  # optimizer steps
            "batch_size": 8,  # rows per optimizer step, over all hosts and accumulation micro-steps
            "grad_accum": 1,  # micro-steps per optimizer step (batch_size must be a multiple)
            "max_len": 256,  # tokens per row; longer pairs are dropped and counted (or an error: too_long)
            "too_long": "drop",  # drop | error
            "pack": False,  # pack several pairs per row (segment ids keep attention inside each pair)
            "learning_rate": 1e-5,  # peak, after warmup
            "schedule": "cosine",  # cosine | linear | constant (after warmup)
            "warmup_steps": 0,
            "end_lr_ratio": 0.1,  # final learning rate / peak (cosine, linear)
            "weight_decay": 0.0,  # AdamW; never applied to norms and biases
            "b1": 0.9,
            "b2": 0.999,
            "clip_norm": 1.0,  # global gradient norm clip; 0 = off
            "remat": "none",  # none | full | dots (rematerialise each layer in the backward pass)
            "lora_rank": 0,  # 0 = full fine-tuning; > 0 = LoRA adapters of this rank, base weights frozen
            "lora_alpha": 16.0,  # LoRA scale = lora_alpha / lora_rank (PEFT's convention)
            "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            "loss_chunk": 128,  # positions per chunk of the cross-entropy (never [B, T, vocab] logits); 0 = off
            "seed": 0,  # data order and LoRA init
            "checkpoint_every": 50,  # steps between Orbax saves (and one at the end, and on SIGTERM)
            "keep_checkpoints": 3,
            "checkpoint_dir": "",  # "" = WORKDIR/checkpoints; or a gs:// path (Orbax writes it directly)
            "log_every": 10,  # steps between metrics rows
            "eval_every": 0,  # steps between System 1 accuracy checks on the eval split; 0 = off
            "peak_flops": 0.0,  # per-device FLOP/s for MFU; 0 = measure a matmul peak at start
        },
        "plan": {  # `s2d plan`
            "device_gb": 16.0,  # memory per device to fit in (TPU v5e: 16, v5p: 95, H100: 80)
            "devices": 0,  # plan for this many devices (e.g. 8 for a v5e-8 host, from a laptop); 0 = this machine's
        },
        "eval": {
            "task": "",  # "" = task.name (e.g. distil on oasst2_judge, evaluate on mt_bench_judge)
            "path": "",  # held-out labelled inputs; "" = generate `n` with `seed` (synthetic tasks)
            "n": 0,
            "offset": 0,  # skip this many inputs of `path` first
            "seed": 1,  # a generator seed apart from task.seed, so the eval inputs are unseen
            "max_new_tokens": 32,  # System 1 answer budget (base and distilled)
            "samples": 1,  # System 2 samples per input: 1 = greedy; more = majority answer, and maj@k
        },
    })


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
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


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
    config = module.get_config()
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


__all__ = ["defaults", "load_config", "load_config_file", "to_dict", "ml_collections"]
