"""Stage `generate`: System 2 rollouts of every unlabelled input, streamed to disk and resumable; on several
hosts one shard per host, merged by `read_rollouts`."""

from __future__ import annotations

import json
import logging
import os
import re
import time

from ml_collections import ConfigDict

from s2d_jax import trackers
from s2d_jax.runtime import distributed, faults, stopping
from s2d_jax.artifacts import complete_lines, read_jsonl, write_atomic, writing
from s2d_jax.build import build_generation_mesh, build_system2
from s2d_jax.errors import S2DError
from s2d_jax.sampling import Sampler, clock
from s2d_jax.stages.inputs import load_inputs, program_args
from s2d_jax.system2.adaptive import samples_needed
from s2d_jax.system2.programs import get_program, run_program

log = logging.getLogger("s2d")


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
    task, examples = load_inputs(config, workdir)
    if not examples:  # the router answered every input with System 1: nothing for System 2 to do
        if distributed.primary() and not os.path.exists(rollout_path(workdir)):
            write_atomic(rollout_path(workdir), "")
        log.info("the router escalated no input: %s is empty", rollout_path(workdir))
        distributed.barrier(f"generate {workdir}")
        return rollout_path(workdir)
    mine = [i % count == me for i in range(len(examples))]
    g = config.generate
    partial = out + ".partial"
    done = {(r["id"], r["sample"]): r["answer"]
            for r in (complete_lines(out) if os.path.exists(out) else complete_lines(partial))}
    plan = Waves(config, done)
    missing = distributed.agree([m and not plan.settled(e.id) for e, m in zip(examples, mine)])
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
    mesh = build_generation_mesh(config)
    sampler = Sampler(*build_system2(config, mesh, workdir), mesh=mesh, max_batch=g.max_batch,
                      cache_dtype=g.cache_dtype or None, warmup=config.compile.warmup)
    compiled = clock.totals()
    owned = {e.id for e, m in zip(examples, mine) if m}
    progress = {"finished": len(examples) - len(todo), "total": len(examples),  # inputs with rollouts on disk
                "samples": 0, "tokens": 0}  # written by this command (this host)
    start = time.perf_counter()
    try:
        _rollouts(config, task, program, todo, sampler, plan, owned, done, partial, progress)
    except stopping.Stopped as e:  # from the engine, mid-chunk: that chunk is dropped, the ones before are kept
        raise stopping.Stopped(e.signum, e.where or f"after {progress['finished']} of {len(examples)} inputs") \
            from None
    os.replace(partial, out)
    now = clock.totals()
    seconds = time.perf_counter() - start
    trackers.log(workdir, "generate", {"inputs": len(todo), "samples": progress["samples"],
                                       "generated_tokens": progress["tokens"], "seconds": seconds,
                                       "tokens_per_s": progress["tokens"] / seconds,
                                       "compiles": now["compiles"] - compiled["compiles"],
                                       "compile_seconds": now["compile_s"] - compiled["compile_s"]})
    log.info("wrote %s (compiles: %d, %.1f s with tracing; %d programs loaded from the persistent cache)", out,
             now["compiles"] - compiled["compiles"], now["compile_s"] - compiled["compile_s"],
             now["cache_hits"] - compiled["cache_hits"])
    distributed.barrier(f"generate {workdir}")  # `filter` may run next, on any host, and reads every shard
    return out


def _rollouts(config, task, program, todo, sampler, plan, owned, done, partial, progress: dict) -> None:
    """Rollouts of the `todo` inputs, chunk by chunk, each appended to `partial` and synced before the next; a stop
    asked for by a signal ends it after a chunk (`progress` counts the inputs done, alike on every host)."""
    g = config.generate
    sampling = dict(temperature=g.temperature, top_k=g.top_k or None, top_p=g.top_p if g.top_p < 1 else None)
    for start in range(0, len(todo), g.chunk):
        chunk = todo[start:start + g.chunk]
        for first, count in plan.waves():  # all n samples at once, or a few at a time (vote-aware sampling)
            run = distributed.agree([e.id in owned and plan.wants(e.id, first, count) for e in chunk])  # same on all
            if not run.any():
                continue
            records = run_program(program, [e for e, r in zip(chunk, run) if r], sampler, count, parse=task.parse,
                                  seed=config.seed, progress=False, first_sample=first, **program_args(config, task),
                                  **sampling)
            with writing(partial), open(partial, "a") as f:
                for rec in records:
                    if rec["id"] in owned and (rec["id"], rec["sample"]) not in done:
                        f.write(json.dumps(rec) + "\n")
                        done[(rec["id"], rec["sample"])] = rec["answer"]
                        progress["samples"] += 1
                        progress["tokens"] += rec["num_tokens"]
                f.flush()
                os.fsync(f.fileno())
        progress["finished"] += len(chunk)
        log.info("rollouts: %d / %d inputs", progress["finished"], progress["total"])
        faults.point("rollout-chunk")
        stopping.check(f"after {progress['finished']} of {progress['total']} inputs")


class Waves:
    """Which samples an input still needs: all `generate.samples` at once, or with `generate.adaptive` a wave of
    `adaptive_wave` at a time, in sample order, until its stopping rule says the rest are not needed."""

    def __init__(self, config: ConfigDict, done: dict):
        g = config.generate
        self.n, self.rule, self.done = g.samples, g.adaptive, done
        self.wave = g.adaptive_wave if g.adaptive != "off" else g.samples
        self.args = dict(min_share=config.filter.min_share, confidence=g.adaptive_confidence)

    def waves(self):
        return [(first, min(self.wave, self.n - first)) for first in range(0, self.n, self.wave)]

    def answers(self, key: str) -> list:
        out = []
        while (key, len(out)) in self.done:
            out.append(self.done[(key, len(out))])
        return out

    def needed(self, key: str) -> int | None:
        """How many samples this input gets in all; None while its drawn answers do not settle it."""
        if self.rule == "off":
            return self.n
        return samples_needed(self.answers(key), self.n, self.wave, self.rule, **self.args)

    def settled(self, key: str) -> bool:
        needed = self.needed(key)
        return needed is not None and all((key, j) in self.done for j in range(needed))

    def wants(self, key: str, first: int, count: int) -> bool:
        """Whether the wave of samples first..first+count-1 is to be drawn (and is not all written yet)."""
        if self.rule != "off" and samples_needed(self.answers(key)[:first], self.n, self.wave, self.rule,
                                                 **self.args) is not None:
            return False  # settled by the samples before this wave
        return any((key, j) not in self.done for j in range(first, first + count))


def read_rollouts(config: ConfigDict, workdir: str) -> list[dict]:
    """The rollouts of `generate`: `rollouts.jsonl`, or the host shards `rollouts-*-of-COUNT.jsonl` merged in input
    order (then sample) after checking that every shard is there and complete, no record is repeated and every
    input has all its samples, so the merge does not depend on how many hosts wrote it."""
    fields = ("id", "sample", "input", "answer")
    single = rollout_path(workdir)
    if os.path.exists(single):
        return read_jsonl(single, fields, empty_ok=True)
    found = [m for f in sorted(os.listdir(workdir)) if (m := re.fullmatch(r"rollouts-\d{5}-of-(\d{5})\.jsonl", f))]
    if not found:
        raise S2DError(f"{single}: no such file, and no host shards rollouts-*-of-*.jsonl (run `s2d generate` first)")
    shards, count = [m.group(0) for m in found], int(found[0].group(1))
    expected = [os.path.basename(rollout_path(workdir, p, count)) for p in range(count)]
    absent = [f for f in expected if f not in shards]
    if absent or len(shards) != count:
        raise S2DError(f"{os.path.join(workdir, (absent or shards)[0])}: the shards of {count} hosts are not all "
                       f"complete (expected {', '.join(expected)}; rerun `s2d generate` on {count} hosts)")
    task, examples = load_inputs(config, workdir)
    order = {e.id: k for k, e in enumerate(examples)}
    rows, seen = [], set()
    for name in expected:
        path = os.path.join(workdir, name)
        for number, row in enumerate(read_jsonl(path, fields, empty_ok=True), 1):
            key = (row["id"], row["sample"])
            if row["id"] not in order:
                raise S2DError(f"{path}: record {number}: input {row['id']!r} is not in the configured inputs")
            if key in seen:
                raise S2DError(f"{path}: record {number}: input {row['id']!r} sample {row['sample']} is repeated")
            seen.add(key)
            rows.append(row)
    plan = Waves(config, {(r["id"], r["sample"]): r["answer"] for r in rows})
    for e in examples:
        if not plan.settled(e.id):
            have = sum(r == e.id for r, _ in seen)
            raise S2DError(f"{workdir}: input {e.id!r} has {have} of its {plan.needed(e.id) or plan.n} samples in "
                           f"the shards")
    return sorted(rows, key=lambda r: (order[r["id"]], r["sample"]))
