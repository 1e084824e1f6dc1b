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

from s2d_jax.config_rules import _, above, at_least, between, mesh_size, one_of
from s2d_jax.errors import S2DError
from s2d_jax.model.attention import IMPLEMENTATIONS
from s2d_jax.model.config import DTYPES, REMAT
from s2d_jax.system2.adaptive import RULES as ADAPTIVE_RULES
from s2d_jax.system2.tasks.judge import DEFAULT_PROMPTS


def defaults() -> ConfigDict:
    """Every key an experiment may set, with its default and so its type."""
    return ConfigDict(_strip(schema()))


def schema() -> dict:
    """The schema: every key, its default (and so its type) and, where a value can be wrong, the rule it obeys."""
    return ({
        "seed": _(0, at_least(0)),
        "model": {
            # HF directory, .gguf file, or hub id (org/name, hf://org/name[/FILE.gguf]); "" = random `preset`
            "path": "",
            "revision": "",  # with a hub id: a branch, tag or commit ("" = main)
            "preset": "",  # a name in s2d_jax.model.PRESETS, used when `path` is ""
            # master parameter dtype of full fine-tuning (float32: bf16 rounds updates away)
            "dtype": _("float32", one_of(*DTYPES)),
            # "" = same as dtype; sampling, eval and LoRA's frozen base hold weights in it
            "compute_dtype": _("", one_of("", *DTYPES)),
            "scan_layers": False,  # stack the layers and run them under lax.scan (compile time flat in depth)
            "attention": _("auto", one_of(*IMPLEMENTATIONS)),  # kernel: s2d_jax/model/attention.py
            "splash_block": _(0, at_least(0)),  # the splash kernel's tile on TPU; 0 = by length (512/256/128)
        },
        "tokenizer": "",  # "" = model.path; a path or hub id; "bytes" = the built-in byte tokenizer
        "mesh": {"data": _(-1, mesh_size()), "fsdp": _(1, mesh_size()), "tensor": _(1, mesh_size())},
        # several hosts: a host that sends no heartbeat for this long is lost, and the others stop (one line each)
        "cluster": {"heartbeat_timeout_s": _(20, at_least(2))},
        "convert": {"output": ""},  # "" = WORKDIR/converted
        "task": {
            "name": "",  # s2d_jax.system2.tasks.TASKS
            "path": "",  # the unlabelled input pool; "" = generate `n` examples (synthetic tasks)
            "n": _(0, at_least(0)),  # how many inputs to use (0 = all in `path`)
            "offset": _(0, at_least(0)),  # skip this many inputs of `path` first (keep the eval split apart)
            "size": _(4, at_least(1)),  # synthetic tasks: words (last letters) or people (coin flip) per input
            "seed": _(0, at_least(0)),  # synthetic tasks: generator seed
            # synthetic tasks: "names" = real first names, as the public sets use (the paper's pools);
            # "syllables" = made-up consonant-vowel words (the toy demo's syllable tokenizer needs them)
            "words": _("names", one_of("names", "syllables")),
            "lang": "en",  # judging pools with languages (OASST2): keep this language; "" = all
            # pairwise judging: FastChat's judge prompts (MT-bench's pair-v2 and its variants), read at run time
            "judge_prompts": DEFAULT_PROMPTS,
            "tfds_data_dir": "",  # with path "tfds:NAME[/CONFIG][:SPLIT]": where the prepared dataset lives
            "input_field": "question",  # TFDS records: the input field (dotted for nested)
            "label_field": "",  # TFDS records: the label field ("" = the task's default)
        },
        "program": {
            "name": "",  # s2d_jax.system2.programs.PROGRAMS
            "chat": True,
            "max_new_tokens": _(0, at_least(0)),  # > 0 sets every stage's token budget; 0 = each stage's own
            "stage_tokens": "",  # per-stage budgets over that, e.g. "rephrase=128,answer=512"
            "criteria": _(5, at_least(1)),  # BSM: criteria in the branch stage's evaluation plan (at most)
            # System 1 prompts (eval, and the distillation set's prompts) end with the program's answer-format
            # instruction and targets follow it, as the paper prompts System 1; False = the bare input and the bare
            # answer (the toy demo, whose pretraining corpus has no instruction)
            "system1_format": True,
        },
        "generate": {
            "samples": _(8, at_least(1)),  # System 2 samples per input (N)
            "temperature": _(0.7, at_least(0.0)),
            "top_k": _(0, at_least(0)),  # 0 = off
            "top_p": _(1.0, between(0.0, 1.0, low_open=True)),  # 1.0 = off
            "max_batch": _(32, at_least(1)),  # sequences per device batch
            "chunk": _(64, at_least(1)),  # inputs per rollout chunk written to disk (the resume granularity)
            # vote-aware sampling (majority filter): draw an input's samples `adaptive_wave` at a time, in sample
            # order, and stop once the vote cannot change ("decided") or by Adaptive-Consistency's Beta rule
            # ("beta", at `adaptive_confidence`); s2d_jax/system2/adaptive.py
            "adaptive": _("off", one_of(*ADAPTIVE_RULES)),
            "adaptive_wave": _(2, at_least(1)),
            "adaptive_confidence": _(0.95, between(0.5, 1.0, high_open=True)),
            # the KV cache's dtype while sampling ("" = the compute dtype); bfloat16 halves a float32 model's cache
            "cache_dtype": _("", one_of("", *DTYPES)),
        },
        "compile": {  # s2d_jax/compile_cache.py
            # JAX's persistent compilation cache: "" = $S2D_XLA_CACHE, else ~/.cache/s2d_jax/xla; "off"; a path
            # (a bucket path shared by a pod's hosts)
            "cache_dir": "",
            # compile the engine's programs for the generate stage's known prompts before its rollouts start
            "warmup": True,
        },
        "filter": {
            # majority (vote) | order_swap (pairwise judging, both orders) | usc (the model picks the most consistent
            # response) | none (the ablation: every input with a parsed first sample, its answer the target)
            "name": _("majority", one_of("majority", "order_swap", "usc", "none")),
            "min_share": _(0.5, between(0.0, 1.0)),  # the vote threshold: share of samples the top answer needs
            # the distillation target: "answer" = the parsed final answer; "response" = the chosen sample's whole
            # final response (S2A as the paper distils it, with usc); "auto" = response with usc, else answer
            "target": _("auto", one_of("auto", "answer", "response")),
        },
        "pretrain": {  # toy base models only (the CPU demo): random `model.preset` -> WORKDIR/base
            "steps": _(0, at_least(0)),  # 0 = no pretraining: the model is `model.path` (or a random preset)
            "corpus_size": _(4000, at_least(1)),  # synthetic prompt/target pairs (the task's `corpus`)
            "cot_max_words": _(6, at_least(1)),  # step-by-step answers for lists of 1..this many words
            "direct_max_words": _(2, at_least(0)),  # direct answers only for lists of 1..this many words
            "direct_share": _(0.3, between(0.0, 1.0)),
            "batch_size": _(16, at_least(1)),
            "learning_rate": _(1e-3, above(0.0)),
            "warmup_steps": _(50, at_least(0)),
            "max_len": _(384, at_least(2)),
            "pack": True,
            "seed": _(0, at_least(0)),
        },
        "train": {
            "data": "",  # prompt/target JSONL; "" = WORKDIR/distill.jsonl
            "steps": _(100, at_least(1)),  # optimizer steps
            "batch_size": _(8, at_least(1)),  # rows per optimizer step, over all hosts and accumulation micro-steps
            "grad_accum": _(1, at_least(1)),  # micro-steps per optimizer step (batch_size must be a multiple)
            "max_len": _(256, at_least(2)),  # tokens per row; longer pairs are dropped and counted (or too_long)
            "too_long": _("drop", one_of("drop", "error")),  # drop | error
            "pack": False,  # pack several pairs per row (segment ids keep attention inside each pair)
            "learning_rate": _(1e-5, above(0.0)),  # peak, after warmup
            "schedule": _("cosine", one_of("cosine", "linear", "constant")),  # after warmup
            "warmup_steps": _(0, at_least(0)),
            "end_lr_ratio": _(0.1, between(0.0, 1.0)),  # final learning rate / peak (cosine, linear)
            "weight_decay": _(0.0, at_least(0.0)),  # AdamW; never applied to norms and biases
            "b1": _(0.9, between(0.0, 1.0, high_open=True)),
            "b2": _(0.999, between(0.0, 1.0, high_open=True)),
            "clip_norm": _(1.0, at_least(0.0)),  # global gradient norm clip; 0 = off
            "remat": _("none", one_of(*REMAT)),  # rematerialise each layer in the backward pass
            "lora_rank": _(0, at_least(0)),  # 0 = full fine-tuning; > 0 = LoRA adapters of this rank, base frozen
            "lora_alpha": _(16.0, above(0.0)),  # LoRA scale = lora_alpha / lora_rank (PEFT's convention)
            "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            "loss_chunk": _(128, at_least(0)),  # positions per cross-entropy chunk (no [B, T, vocab] logits); 0 = off
            "seed": _(0, at_least(0)),  # data order and LoRA init
            "checkpoint_every": _(50, at_least(1)),  # steps between Orbax saves (and one at the end, and on SIGTERM)
            "keep_checkpoints": _(3, at_least(1)),
            "checkpoint_dir": "",  # "" = WORKDIR/checkpoints; or a gs:// path (Orbax writes it directly)
            "log_every": _(10, at_least(1)),  # steps between metrics rows
            "eval_every": _(0, at_least(0)),  # steps between System 1 accuracy checks on the eval split; 0 = off
            "peak_flops": _(0.0, at_least(0.0)),  # per-device FLOP/s for MFU; 0 = measure a matmul peak at start
        },
        "plan": {  # `s2d plan`
            "device_gb": _(16.0, above(0.0)),  # memory per device to fit in (TPU v5e: 16, v5p: 95, H100: 80)
            "devices": _(0, at_least(0)),  # plan for this many devices (8 for a v5e-8 host, from a laptop); 0 = here
            # compile every device program for this accelerator type ahead of time (v5e-8, v5p-64, ...: s2d_jax/aot.py)
            # and report XLA's figures beside the estimate; "" = the estimate only
            "topology": "",
        },
        "eval": {
            "task": "",  # "" = task.name (e.g. distil on oasst2_judge, evaluate on mt_bench_judge)
            "path": "",  # held-out labelled inputs; "" = generate `n` with `seed` (synthetic tasks)
            "n": _(0, at_least(0)),
            "offset": _(0, at_least(0)),  # skip this many inputs of `path` first
            "seed": _(1, at_least(0)),  # a generator seed apart from task.seed, so the eval inputs are unseen
            "max_new_tokens": _(0, at_least(0)),  # System 1 answer budget (base and distilled); 0 = the task's own
            "samples": _(1, at_least(1)),  # System 2 samples per input: 1 = greedy; more = majority answer, and maj@k
            # robustness: the held-out inputs again under each named prompt perturbation (coin flip: see
            # CoinFlip.VARIANTS); accuracy per variant for every system
            "variants": (),
        },
    })


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
    context = _context(c)
    if context:
        for key in ("program.max_new_tokens", "eval.max_new_tokens", "train.max_len", "pretrain.max_len"):
            value = _lookup(c, key, c, key)
            if value >= context:
                yield key, f"{value} does not fit the model's context of {context} positions"


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
