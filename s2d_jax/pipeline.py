"""The stages of `s2d`, each a function of (config, workdir) that writes its artifact atomically."""

from __future__ import annotations

import collections
import json
import logging
import os
import re

from ml_collections import ConfigDict

from s2d_jax import distributed, mesh as mesh_lib
from s2d_jax.artifacts import complete_lines, read_jsonl, write_atomic
from s2d_jax.errors import S2DError
from s2d_jax.model import PRESETS, init_model, load_model, save_hf
from s2d_jax.sampling import Sampler
from s2d_jax.system2.filters import FilterReport, order_swap, parse_usc, usc, usc_prompt, vote
from s2d_jax.system2.programs import get_program, run_program
from s2d_jax.system2.tasks import Example, get_task, tfds_source
from s2d_jax.system2.tasks.judge import SWAP_SUFFIX
from s2d_jax.tokenizer import SYLLABLES, load_tokenizer, syllable_tokenizer

log = logging.getLogger("s2d")


def mesh_devices(config: ConfigDict) -> list:
    """The devices the configured mesh uses: all of them, or the first data x fsdp x tensor when that is fewer."""
    import jax

    m = config.mesh
    devices = jax.devices()
    if -1 not in (m.data, m.fsdp, m.tensor) and 0 < (wanted := m.data * m.fsdp * m.tensor) < len(devices):
        log.info("mesh %s uses %d of the %d devices", dict(data=m.data, fsdp=m.fsdp, tensor=m.tensor), wanted,
                 len(devices))
        devices = devices[:wanted]
    return devices


def build_mesh(config: ConfigDict):
    """The configured mesh, or None for a single device (no sharding annotations at all)."""
    m = config.mesh
    mesh = mesh_lib.make_mesh(m.data, m.fsdp, m.tensor, devices=mesh_devices(config))
    return None if mesh.size == 1 else mesh


def toy_base(config: ConfigDict, workdir: str | None) -> str | None:
    """WORKDIR/base when the run pretrains its own toy base model (`pretrain.steps` > 0 and no `model.path`)."""
    return os.path.join(workdir or ".", "base") if config.pretrain.steps > 0 and not config.model.path else None


def build_model(config: ConfigDict, mesh=None, workdir: str | None = None, base: bool = True, tokenizer=None):
    """The model the config names: the checkpoint at `model.path`; else, with `pretrain.steps`, the toy base model
    `s2d pretrain` wrote to WORKDIR/base; else a random `model.preset` seeded by `seed` (also what pretraining
    starts from: `base=False`, sized to `tokenizer`'s vocabulary and end-of-turn token when given)."""
    m = config.model
    compute = m.compute_dtype or m.dtype
    path = m.path or (toy_base(config, workdir) if base else None)
    if path and not m.path and not os.path.exists(path):
        raise S2DError(f"{path}: no pretrained base model (config key 'pretrain.steps' > 0: run "
                       f"`s2d pretrain` or `s2d run` first)")
    if path:
        return load_model(path, dtype=m.dtype, compute_dtype=compute, mesh=mesh)
    if m.preset not in PRESETS:
        raise S2DError(f"config key 'model.preset': {m.preset!r} is not a preset (presets: {', '.join(PRESETS)}); "
                       f"or set 'model.path' to a checkpoint")
    cfg = PRESETS[m.preset].replace(param_dtype=m.dtype, dtype=compute)
    if tokenizer is not None:
        cfg = cfg.replace(vocab_size=max(cfg.vocab_size, -(-len(tokenizer) // 64) * 64),
                          eos_token_ids=(tokenizer.eos_token_id,))
    return init_model(cfg, seed=config.seed, mesh=mesh)


def build_tokenizer(config: ConfigDict, workdir: str | None = None):
    """The tokenizer of `model.path`, or `tokenizer` (a path or `bytes`); in a run that pretrains a toy base
    model, the one pretraining used, saved with it in WORKDIR/base."""
    base = toy_base(config, workdir)
    if base and workdir and os.path.exists(base):
        return load_tokenizer(base)
    if config.tokenizer == SYLLABLES:
        raise S2DError(f"config key 'tokenizer': {SYLLABLES!r} is built by `s2d pretrain` and saved in {base}; "
                       f"run `s2d pretrain` or `s2d run` first")
    path = config.tokenizer or config.model.path
    if not path:
        raise S2DError("config key 'tokenizer': empty, and 'model.path' is empty too (set one, or 'bytes')")
    return load_tokenizer(path)


def convert(config: ConfigDict, workdir: str) -> str:
    """Stage `convert`: the configured model (HF directory, GGUF file or preset) as an HF directory with its
    tokenizer, which transformers and `load_model` both read."""
    out = config.convert.output or os.path.join(workdir, "converted")
    if os.path.exists(out):
        raise S2DError(f"{out}: already exists; not overwriting it (remove it or set --config.convert.output)")
    model = build_model(config, workdir=workdir)
    tok = build_tokenizer(config, workdir)
    save_hf(model, out, tokenizer=tok)
    log.info("wrote %s (%s, %.1fM parameters)", out, model.cfg.model_type, model.cfg.num_params / 1e6)
    return out




# ------------------------------------------------------------------------------------------ System 2 stages

FILTERS = ("majority", "order_swap", "usc")


def _examples(task, path: str, n: int, offset: int, seed: int, size: int, group: str, t: ConfigDict):
    if path.startswith(tfds_source.PREFIX):
        examples = tfds_source.load_tfds(task, path, data_dir=t.tfds_data_dir, input_field=t.input_field,
                                         label_field=t.label_field, limit=n + offset if n else 0)
    elif path:
        examples = task.load(path)
    elif hasattr(task, "generate") and n > 0:
        examples = task.generate(n, seed=seed, **{task.size_arg: size})
    else:
        raise S2DError(f"config key '{group}.path': empty, and task {task.name!r} cannot be generated without "
                       f"'{group}.n' > 0")
    examples = examples[offset:offset + n] if n else examples[offset:]
    if not examples:
        raise S2DError(f"task {task.name!r}: the {group} input set is empty")
    return examples


def load_inputs(config: ConfigDict):
    """The task and its unlabelled input pool (labels are kept on the examples but never used to distil), each
    input followed by its swapped twin when the filter compares verdicts in both orders (`order_swap`)."""
    task = get_task(config.task.name)
    t = config.task
    examples = _examples(task, t.path, t.n, t.offset, t.seed, t.size, "task", t)
    return task, with_swapped(task, examples) if config.filter.name == "order_swap" else examples


def with_swapped(task, examples):
    """Each example followed by its swapped twin (the responses exchanged)."""
    if task.swap(examples[0]) is None:
        raise S2DError(f"config key 'filter.name': order_swap needs a pairwise judging task; {task.name!r} has no "
                       f"swapped form (use majority or usc)")
    return [x for e in examples for x in (e, task.swap(e))]


def load_eval_inputs(config: ConfigDict):
    """The task and its held-out labelled split (`eval.*`; generated with `eval.seed` for synthetic tasks)."""
    e = config.eval
    task = get_task(e.task or config.task.name)
    return task, _examples(task, e.path, e.n, e.offset, e.seed, config.task.size, "eval", config.task)


def rollout_path(workdir: str, process: int = 0, count: int = 1) -> str:
    """`rollouts.jsonl` on one host; host `process` of `count` writes `rollouts-PROCESS-of-COUNT.jsonl`."""
    name = "rollouts.jsonl" if count == 1 else f"rollouts-{process:05d}-of-{count:05d}.jsonl"
    return os.path.join(workdir, name)


def generate(config: ConfigDict, workdir: str) -> str:
    """Stage `generate`: System 2 rollouts of every input, streamed to `<rollouts>.partial` chunk by chunk and
    renamed when complete. A rerun skips the (input, sample) pairs already written.

    On several hosts the sampler runs on the global mesh (every host computes every batch together) and host `p`
    of `P` writes the inputs `p, p + P, ...` to its own shard; `filter` merges the shards. Which inputs are still
    missing is agreed over all hosts, so a rerun after a kill resumes on every host alike."""
    import jax

    count, me = jax.process_count(), jax.process_index()
    if count > 1 and os.path.exists(rollout_path(workdir)):
        log.info("%s is complete (written by one host); skipping generate", rollout_path(workdir))
        return rollout_path(workdir)
    out = rollout_path(workdir, me, count)
    task, examples = load_inputs(config)
    mine = [i % count == me for i in range(len(examples))]
    g = config.generate
    n = g.samples
    partial = out + ".partial"
    done = {(r["id"], r["sample"]) for r in (complete_lines(out) if os.path.exists(out) else complete_lines(partial))}
    missing = distributed.agree([m and any((e.id, j) not in done for j in range(n)) for e, m in zip(examples, mine)])
    if not missing.any():
        if not os.path.exists(out):  # everything was written, but a kill came before the rename
            os.replace(partial, out)
        log.info("%s is complete; skipping generate", out)
        distributed.barrier(f"generate {workdir}")
        return out
    program = get_program(config.program.name)
    program.check(sorted({k for e in examples for k in e.meta}))
    if os.path.exists(out):  # complete here, but another host lost its shard: redo that part only
        os.replace(out, partial)
    todo = [e for e, m in zip(examples, missing) if m]
    if len(todo) < len(examples):
        log.info("resuming: %d of %d inputs already have their rollouts", len(examples) - len(todo), len(examples))
    mesh = build_mesh(config)
    sampler = Sampler(build_model(config, mesh, workdir), build_tokenizer(config, workdir), mesh=mesh,
                      max_batch=g.max_batch)
    sampling = dict(temperature=g.temperature, top_k=g.top_k or None, top_p=g.top_p if g.top_p < 1 else None)
    owned = {e.id for e, m in zip(examples, mine) if m}
    for start in range(0, len(todo), g.chunk):
        chunk = todo[start:start + g.chunk]
        records = run_program(program, chunk, sampler, n, parse=task.parse, seed=config.seed,
                              chat=config.program.chat, max_new_tokens=config.program.max_new_tokens or None,
                              progress=False, **sampling)
        with open(partial, "a") as f:
            for rec in records:
                if rec["id"] in owned and (rec["id"], rec["sample"]) not in done:
                    f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("rollouts: %d / %d inputs", len(examples) - len(todo) + start + len(chunk), len(examples))
    os.replace(partial, out)
    log.info("wrote %s", out)
    distributed.barrier(f"generate {workdir}")  # `filter` may run next, on any host, and reads every shard
    return out


def read_rollouts(config: ConfigDict, workdir: str) -> list[dict]:
    """The rollouts of `generate`: `rollouts.jsonl`, or the host shards `rollouts-*-of-COUNT.jsonl` merged in input
    order (then sample) after checking that every shard is there and complete, no record is repeated and every
    input has all its samples, so the merge does not depend on how many hosts wrote it."""
    fields = ("id", "sample", "input", "answer")
    single = rollout_path(workdir)
    if os.path.exists(single):
        return read_jsonl(single, fields)
    found = [m for f in sorted(os.listdir(workdir)) if (m := re.fullmatch(r"rollouts-\d{5}-of-(\d{5})\.jsonl", f))]
    if not found:
        raise S2DError(f"{single}: no such file, and no host shards rollouts-*-of-*.jsonl (run `s2d generate` first)")
    shards, count = [m.group(0) for m in found], int(found[0].group(1))
    expected = [os.path.basename(rollout_path(workdir, p, count)) for p in range(count)]
    absent = [f for f in expected if f not in shards]
    if absent or len(shards) != count:
        raise S2DError(f"{os.path.join(workdir, (absent or shards)[0])}: the shards of {count} hosts are not all "
                       f"complete (expected {', '.join(expected)}; rerun `s2d generate` on {count} hosts)")
    task, examples = load_inputs(config)
    order = {e.id: k for k, e in enumerate(examples)}
    rows, seen = [], set()
    for name in expected:
        path = os.path.join(workdir, name)
        for number, row in enumerate(read_jsonl(path, fields), 1):
            key = (row["id"], row["sample"])
            if row["id"] not in order:
                raise S2DError(f"{path}: record {number}: input {row['id']!r} is not in the configured inputs")
            if key in seen:
                raise S2DError(f"{path}: record {number}: input {row['id']!r} sample {row['sample']} is repeated")
            seen.add(key)
            rows.append(row)
    want = config.generate.samples
    for e in examples:
        have = sum((e.id, j) in seen for j in range(want))
        if have != want:
            raise S2DError(f"{workdir}: input {e.id!r} has {have} of its {want} samples in the shards")
    return sorted(rows, key=lambda r: (order[r["id"]], r["sample"]))


def filter(config: ConfigDict, workdir: str) -> str:  # noqa: A001 (the stage's name)
    """Stage `filter`: self-consistency over each input's samples (`filter.name`: majority vote, order-swap
    consistency for pairwise judging, or USC for free-form answers); the kept inputs become `distill.jsonl`
    (System 1 prompt -> the consistent answer) and the decisions are summed in `filter_report.json`."""
    name = config.filter.name
    if name not in FILTERS:
        raise S2DError(f"config key 'filter.name': unknown filter {name!r} (filters: {', '.join(FILTERS)})")
    out = os.path.join(workdir, "distill.jsonl")
    if os.path.exists(out):
        log.info("%s is complete; skipping filter", out)
        return out
    source = rollout_path(workdir)
    task = get_task(config.task.name)
    grouped: dict[str, list[dict]] = collections.OrderedDict()
    for row in read_rollouts(config, workdir):
        grouped.setdefault(row["id"], []).append(row)
    for rows in grouped.values():
        rows.sort(key=lambda r: r["sample"])
    answers = {key: [r["answer"] for r in rows] for key, rows in grouped.items()}
    keys = [k for k in grouped if not k.endswith(SWAP_SUFFIX)]
    if name == "order_swap":
        unpaired = [k for k in keys if k + SWAP_SUFFIX not in grouped]
        if unpaired:
            raise S2DError(f"{source}: input {unpaired[0]!r} has no swapped twin {unpaired[0] + SWAP_SUFFIX!r} "
                           f"(generate with filter.name=order_swap to judge both orders)")
        decisions = [order_swap(answers[k], answers[k + SWAP_SUFFIX], config.filter.min_share) for k in keys]
    elif name == "usc":
        decisions = _usc_decisions(config, [grouped[k] for k in keys], workdir)
    else:
        decisions = [vote(answers[k], config.filter.min_share) for k in keys]
    report, lines = FilterReport(), []
    for key, decision in zip(keys, decisions):
        report.add(decision)
        if decision.reason is None:
            prompt = task.system1_prompt(Example(key, grouped[key][0]["input"]))
            votes = dict(collections.Counter(a for a in answers[key] if a is not None).most_common())
            lines.append(json.dumps({"id": key, "prompt": prompt, "target": task.target(decision.answer),
                                     "votes": votes, "agreement": decision.share}))
    write_atomic(os.path.join(workdir, "filter_report.json"),
                 json.dumps({"filter": name, **report.to_dict()}, indent=2) + "\n")
    write_atomic(out, "".join(line + "\n" for line in lines))
    log.info("kept %d of %d inputs (%.0f%%); drops: %s", report.kept, report.total, 100 * report.kept_fraction,
             dict(report.drops) or "none")
    return out


def _usc_decisions(config: ConfigDict, groups: list[list[dict]], workdir: str):
    """USC: one greedy sampler call per input asks the model for the most consistent of its N final outputs."""
    mesh = build_mesh(config)
    sampler = Sampler(build_model(config, mesh, workdir), build_tokenizer(config, workdir), mesh=mesh,
                      max_batch=config.generate.max_batch)
    prompts = [usc_prompt(rows[0]["input"], [r["stages"][-1]["output"] if r.get("stages") else str(r["answer"])
                                             for r in rows]) for rows in groups]
    outs = sampler.generate(prompts, max_new_tokens=32, chat=config.program.chat, progress=True)
    return [usc(parse_usc(s.text, len(rows)), [r["answer"] for r in rows]) for (s,), rows in zip(outs, groups)]


def train(config: ConfigDict, workdir: str) -> str:
    """Stage `train`: fine-tune the model on `train.data` (default `distill.jsonl`), checkpointing to
    `checkpoints/` and resuming from it; the final parameters are exported to `model/` (HF format)."""
    from s2d_jax import evaluate
    from s2d_jax.train import Trainer

    out = os.path.join(workdir, "model")
    if os.path.exists(out):
        log.info("%s is complete; skipping train", out)
        return out
    data = config.train.data or os.path.join(workdir, "distill.jsonl")
    if not os.path.exists(data):
        raise S2DError(f"{data}: no such file (run `s2d filter` first, or set 'train.data')")
    mesh = build_mesh(config)
    model, tok = build_model(config, mesh, workdir), build_tokenizer(config, workdir)
    eval_fn = None
    if config.train.eval_every:
        task, examples = load_eval_inputs(config)
        eval_fn = lambda m: evaluate.system1(m, tok, task, examples, chat=config.program.chat,
                                             max_new_tokens=config.eval.max_new_tokens, mesh=mesh,
                                             max_batch=config.generate.max_batch)
    result = Trainer(model, tok, config, workdir, mesh=mesh, chat=config.program.chat, eval_fn=eval_fn).fit()
    log.info("trained %d steps: %s", result.step, {k: round(v, 4) for k, v in result.metrics.items()})
    save_hf(model, out, tokenizer=tok)
    log.info("wrote %s", out)
    return out


def evaluate_stage(config: ConfigDict, workdir: str) -> str:
    """Stage `eval`: System 1 (the base model, direct), System 2 (the program) and the distilled System 1 (`model/`)
    on the held-out split; writes `eval.json`, then `report.md` and `report.png`."""
    from s2d_jax import evaluate
    from s2d_jax.report import write_report

    out = os.path.join(workdir, "eval.json")
    if os.path.exists(out):
        log.info("%s is complete; skipping eval", out)
        return out
    distilled_dir = os.path.join(workdir, "model")
    nothing_kept = _nothing_kept(workdir)
    if not os.path.exists(distilled_dir) and not nothing_kept:
        raise S2DError(f"{distilled_dir}: no such directory (run `s2d train` first)")
    task, examples = load_eval_inputs(config)
    if task.swap(examples[0]) is not None:  # judging: both orders, for position inconsistency
        examples = with_swapped(task, examples)
    program = get_program(config.program.name)
    mesh, tok = build_mesh(config), build_tokenizer(config, workdir)
    e, g = config.eval, config.generate
    common = dict(chat=config.program.chat, mesh=mesh, max_batch=g.max_batch)
    base = build_model(config, mesh, workdir)
    results = {"meta": {"task": task.name, "program": program.name, "model": config.model.path or config.model.preset,
                        "eval_inputs": len(examples)}}
    log.info("eval: System 1 (base) on %d inputs", len(examples))
    results["system1"] = evaluate.system1(base, tok, task, examples, max_new_tokens=e.max_new_tokens, **common)
    log.info("eval: System 2 (%s)", program.name)
    results["system2"] = evaluate.system2(
        program, base, tok, task, examples, samples=e.samples, seed=config.seed,
        max_new_tokens=config.program.max_new_tokens or None, temperature=g.temperature, top_k=g.top_k or None,
        top_p=g.top_p if g.top_p < 1 else None, **common)
    del base
    if nothing_kept:  # an honest report of a run whose filter kept nothing: there is no distilled model
        results["distilled"] = None
        results["meta"]["note"] = ("No input passed the self-consistency filter, so nothing was distilled: the "
                                   "base model's System 2 answers never agreed often enough (see the filter line).")
    else:
        m = config.model
        distilled = load_model(distilled_dir, dtype=m.dtype, compute_dtype=m.compute_dtype or m.dtype, mesh=mesh)
        log.info("eval: distilled System 1")
        results["distilled"] = evaluate.system1(distilled, tok, task, examples, max_new_tokens=e.max_new_tokens,
                                                **common)
    report_path = os.path.join(workdir, "filter_report.json")
    if os.path.exists(report_path):
        with open(report_path) as f:
            results["filter"] = json.load(f)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        rows = [r for r in read_jsonl(metrics_path) if "loss" in r]
        results["train"] = rows[-1] if rows else None
    if distributed.primary():  # on several hosts, one writes (each host timed its own share of the work)
        write_report(results, workdir)
        write_atomic(out, json.dumps(results, indent=2) + "\n")
    distributed.barrier(f"eval {workdir}")
    for name in ("system1", "system2", "distilled"):
        r = results[name]
        if r is None:
            log.warning("%-9s none: the filter kept no input, nothing was distilled", name)
            continue
        log.info("%-9s accuracy %5.1f%%  mean tokens %6.1f", name, 100 * r["accuracy"], r["mean_tokens"])
    log.info("wrote %s, %s, %s", out, os.path.join(workdir, "report.md"), os.path.join(workdir, "report.png"))
    return out


# How a run is laid out on devices, not what it computes: a run may resume on another mesh or host count.
LAYOUT = ("mesh", "plan")


def keep_config(config: ConfigDict, workdir: str) -> None:
    """The workdir keeps the resolved config it was made with; a rerun with a different one is an error (its
    artifacts would silently mix two experiments). The device layout (`mesh`, `plan`) may change."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(json.dumps(config.to_dict()))
    if os.path.exists(path):
        with open(path) as f:
            kept = json.load(f)
        kept.update({k: current[k] for k in LAYOUT if k in current})
        if kept != current:
            key = _first_difference(kept, current)
            raise S2DError(f"{path}: this workdir was made with a different config (key {key!r}: "
                           f"{_get(kept, key)!r} there, {_get(current, key)!r} now); use another --workdir")
        return
    write_atomic(path, json.dumps(current, indent=2) + "\n")


def _first_difference(a, b, prefix=""):
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = _first_difference(x, y, prefix + key + ".")
            if found:
                return found
        elif x != y:
            return prefix + key
    return None


def _get(d, dotted):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def pretrain(config: ConfigDict, workdir: str) -> str:
    """Stage `pretrain` (toy base models, the CPU demo): train `model.preset` from random init on the task's
    synthetic corpus (step-by-step answers for every list length, direct answers only for short ones) with the
    same trainer, and write the base model to WORKDIR/base."""
    from s2d_jax.train import Trainer

    p = config.pretrain
    out = os.path.join(workdir, "base")
    if p.steps <= 0:
        raise S2DError("config key 'pretrain.steps': 0, so there is no toy base model to pretrain")
    if config.model.path:
        raise S2DError("config key 'pretrain.steps' > 0 with 'model.path' set: pretraining starts from a random "
                       "'model.preset', not a checkpoint")
    if os.path.exists(out):
        log.info("%s is complete; skipping pretrain", out)
        return out
    task = get_task(config.task.name)
    if not hasattr(task, "corpus"):
        raise S2DError(f"config key 'pretrain.steps': task {task.name!r} has no synthetic corpus to pretrain on")
    here = os.path.join(workdir, "pretrain")
    os.makedirs(here, exist_ok=True)
    corpus = os.path.join(here, "corpus.jsonl")
    rows = task.corpus(p.corpus_size, p.seed, get_program(config.program.name).stages[0].template,
                       cot_max_words=p.cot_max_words, direct_max_words=p.direct_max_words,
                       direct_share=p.direct_share)
    write_atomic(corpus, "".join(json.dumps(r) + "\n" for r in rows))
    if config.tokenizer == SYLLABLES:
        if not hasattr(task, "syllables"):
            raise S2DError(f"config key 'tokenizer': {SYLLABLES!r} needs a task of made-up words; {task.name!r} "
                           f"has no syllables")
        tok = syllable_tokenizer(task.syllables, [r["prompt"] for r in rows])
    else:
        tok = build_tokenizer(config)
    sub = ConfigDict(config.to_dict())
    sub.train.update(data=corpus, checkpoint_dir="", steps=p.steps, batch_size=p.batch_size,
                     learning_rate=p.learning_rate, max_len=p.max_len, warmup_steps=p.warmup_steps, seed=p.seed,
                     pack=p.pack, eval_every=0,
                     checkpoint_every=max(p.steps // 4, 1), log_every=max(min(p.steps // 20, 50), 1),
                     schedule="cosine", end_lr_ratio=0.1)
    mesh = build_mesh(config)
    model = build_model(config, mesh, base=False, tokenizer=tok)
    result = Trainer(model, tok, sub, here, mesh=mesh, chat=config.program.chat).fit()
    log.info("pretrained %d steps: loss %.4f, token accuracy %.3f", result.step, result.metrics.get("loss", 0),
             result.metrics.get("accuracy", 0))
    save_hf(model, out, tokenizer=tok)
    log.info("wrote %s", out)
    return out


def _nothing_kept(workdir: str) -> bool:
    """True when `filter` ran and kept no input (an empty `distill.jsonl`)."""
    path = os.path.join(workdir, "distill.jsonl")
    return os.path.exists(path) and os.path.getsize(path) == 0


def run(config: ConfigDict, workdir: str) -> str:
    """Stage `run`: [pretrain ->] generate -> filter -> train -> eval, skipping each stage whose artifact is
    complete, so a killed run reruns from where it stopped."""
    keep_config(config, workdir)
    stages = ((pretrain,) if toy_base(config, workdir) else ()) + (
        generate, filter, train, evaluate_stage)
    for stage in stages:
        if stage is train and _nothing_kept(workdir) and not config.train.data:
            log.warning("the filter kept no input: skipping train; the report says so")
            continue
        stage(config, workdir)
    return os.path.join(workdir, "report.md")


def plan_stage(config: ConfigDict, workdir: str) -> str:
    """Stage `plan`: per-device bytes of parameters, optimizer state, activations (estimated) and KV cache for the
    configured mesh, written to `plan.json`; an error with advice when they do not fit `plan.device_gb`."""
    from s2d_jax import plan as plan_lib

    p = plan_lib.plan(config, plan_lib.mesh_shape(config.mesh, config.plan.devices or len(mesh_devices(config))))
    out = os.path.join(workdir, "plan.json")
    write_atomic(out, json.dumps(p, indent=2) + "\n")
    print(plan_lib.report(p))
    problems = plan_lib.advice(p, config)
    if problems:
        raise S2DError("; ".join(problems))
    return out


STAGES = {"plan": plan_stage, "convert": convert, "pretrain": pretrain, "generate": generate, "filter": filter,
          "train": train, "eval": evaluate_stage, "run": run}
