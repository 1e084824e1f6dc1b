"""The task's inputs a stage works on: the unlabelled pool (generate, filter), the held-out split (eval) and the
examples a model trains on (train, and the probe on those train left out)."""

from __future__ import annotations

import os

from ml_collections import ConfigDict

from s2d_jax import datasets
from s2d_jax.artifacts import read_jsonl
from s2d_jax.errors import S2DError
from s2d_jax.system2.tasks import get_task, tfds_source

ROUTED = "route.jsonl"  # the router's decisions on the pool (stages/route.py)


def _examples(task, path: str, n: int, offset: int, seed: int, size: int, group: str, t: ConfigDict):
    if path.startswith(tfds_source.PREFIX):
        examples = tfds_source.load_tfds(task, path, data_dir=t.tfds_data_dir, input_field=t.input_field,
                                         label_field=t.label_field, limit=n + offset if n else 0)
    elif path:
        task.configure(t, split="heldout" if group == "eval" else "train")
        examples = task.load(datasets.resolve(path))
    elif hasattr(task, "generate") and n > 0:
        examples = _generated(task, n + offset, seed, size, t)
    else:
        raise S2DError(f"config key '{group}.path': empty, and task {task.name!r} cannot be generated without "
                       f"'{group}.n' > 0")
    examples = examples[offset:offset + n] if n else examples[offset:]
    if not examples:
        raise S2DError(f"task {task.name!r}: the {group} input set is empty")
    return examples


def _generated(task, n: int, seed: int, size: int, t: ConfigDict):
    """`n` synthetic inputs of `size` words (people), or with `task.size_max` of size..size_max in turn (input i has
    size + i mod k), so every slice of the pool holds each size alike."""
    sizes = list(range(size, max(t.size_max, size) + 1))
    per_size = [task.generate(-(-(n - k) // len(sizes)), seed=seed, words=t.words, **{task.size_arg: s})
                for k, s in enumerate(sizes)]
    return [per_size[i % len(sizes)][i // len(sizes)] for i in range(n)]


def load_inputs(config: ConfigDict, workdir: str | None = None):
    """The task and its unlabelled input pool (labels are kept on the examples but never used to distil), each
    input followed by its swapped twin when the filter compares verdicts in both orders (`order_swap`). With
    `workdir` holding the router's `route.jsonl`, only the inputs it escalated to System 2."""
    task = get_task(config.task.name)
    t = config.task
    examples = _examples(task, t.path, t.n, t.offset, t.seed, t.size, "task", t)
    routed = os.path.join(workdir, ROUTED) if workdir else None
    if routed and os.path.exists(routed):
        up = {r["id"] for r in read_jsonl(routed, ("id", "escalated"), empty_ok=True) if r["escalated"]}
        examples = [e for e in examples if e.id in up]
        if not examples:
            return task, []
    return task, with_swapped(task, examples) if config.filter.name == "order_swap" else examples


def pool_size(config: ConfigDict) -> int:
    """How many unlabelled inputs the pool holds (without swapped twins)."""
    t = config.task
    if t.n and not t.path:
        return t.n
    return len(_examples(get_task(t.name), t.path, t.n, t.offset, t.seed, t.size, "task", t))


def check_rounds(config: ConfigDict) -> int:
    """The pool's size, checked to hold every round's inputs (`loop.rounds`, `loop.round_size`)."""
    total, count, size = pool_size(config), config.loop.rounds, config.loop.round_size
    if size and total < count * size:
        raise S2DError(f"config key 'loop.round_size': {count} rounds of {size} inputs need {count * size} unlabelled "
                       f"inputs; the stream has {total} (round {total // size + 1} would have {total % size}): add "
                       f"inputs (`task.n`, or lines to `task.path`) or run fewer rounds")
    if total < count:
        raise S2DError(f"config key 'loop.rounds': {count} rounds need at least {count} unlabelled inputs (the pool "
                       f"has {total}; each round takes the next slice of it)")
    return total


def with_swapped(task, examples):
    """Each example followed by its swapped twin (the responses exchanged)."""
    if task.swap(examples[0]) is None:
        raise S2DError(f"config key 'filter.name': order_swap needs a pairwise judging task; {task.name!r} has no "
                       f"swapped form (use majority or usc)")
    return [x for e in examples for x in (e, task.swap(e))]


def system1_prompt(config: ConfigDict, task, example) -> str:
    """System 1's prompt for an input: with the program's answer-format instruction unless
    `program.system1_format` is off."""
    return task.system1_prompt(example, system1_instruction(config))


def system1_target(config: ConfigDict, task, answer) -> str:
    return task.target(answer, system1_instruction(config))


def program_args(config: ConfigDict, task) -> dict:
    """`run_program`'s keywords from the config: each stage's budget and the program's parameters."""
    from s2d_jax.system2.programs import get_program

    p = config.program
    budgets = get_program(p.name).budgets(p.max_new_tokens, p.stage_tokens, task.answer_tokens)
    return {"budgets": budgets, "params": {"criteria": p.criteria}, "chat": p.chat}


def system1_instruction(config: ConfigDict) -> str:
    """The answer-format instruction System 1 gets ("" with `program.system1_format` off)."""
    from s2d_jax.system2.programs import get_program

    return get_program(config.program.name).answer_format if config.program.system1_format else ""


def load_eval_inputs(config: ConfigDict):
    """The task and its held-out labelled split (`eval.*`; generated with `eval.seed` for synthetic tasks)."""
    e = config.eval
    task = get_task(e.task or config.task.name)
    return task, _examples(task, e.path, e.n, e.offset, e.seed, config.task.size, "eval", config.task)


def train_data(config: ConfigDict, workdir: str) -> str:
    """What `train` fine-tunes on: `train.data`, or in a round with `loop.accumulate` every round's kept examples
    so far (`train.jsonl`, written by the loop), else the workdir's own `distill.jsonl`."""
    if config.train.data:
        return datasets.resolve(config.train.data)
    pooled = os.path.join(workdir, "train.jsonl")
    return pooled if os.path.exists(pooled) else os.path.join(workdir, "distill.jsonl")
