"""`s2d eval --harness TASKS`: lm-evaluation-harness tasks scored on System 1 (the base model, or in a round the
previous round's distilled one), on the distilled model (`model/`) and on the routed system (System 1 escalating
to System 2 where its router is not sure), through our sampler and forward pass;
`harness.json` (and `harness_samples.jsonl`: each request's response and score)."""

from __future__ import annotations

import json
import logging
import os

from ml_collections import ConfigDict

from s2d_jax import trackers
from s2d_jax.artifacts import write_atomic
from s2d_jax.build import build_generation_mesh, build_model, build_system1, build_system2, build_tokenizer
from s2d_jax.errors import S2DError
from s2d_jax.runtime import distributed

log = logging.getLogger("s2d")
OUT = "harness.json"


def check(config: ConfigDict, workdir: str) -> dict:
    """Before anything is written: the tasks exist and their data loads (one line each), and the models to score
    are there. The loaded tasks (loaded once per process)."""
    from s2d_jax import harness as harness_lib

    h = config.eval.harness
    if not h.tasks:
        raise S2DError("config key 'eval.harness.tasks': name at least one harness task (s2d eval --harness TASKS)")
    distilled = os.path.join(workdir, "model")
    if "routed" in h.systems and config.route.method == "none":
        raise S2DError("config key 'route.method': the routed system needs a router (agreement or logprob)")
    if "distilled" in h.systems and not os.path.exists(distilled):
        raise S2DError(f"config key 'eval.harness.systems': {distilled}: no distilled model (run `s2d train` first, "
                       f"or --config.eval.harness.systems=system1)")
    return harness_lib.tasks(tuple(h.tasks), h.include_path)


def harness(config: ConfigDict, workdir: str) -> str:
    """lm-evaluation-harness's tasks (`eval.harness.tasks`) on each of `eval.harness.systems`: `harness.json`,
    `harness_samples.jsonl`, and the scores to the trackers as `harness/SYSTEM/TASK/METRIC/FILTER`."""
    from lm_eval import simple_evaluate

    from s2d_jax import harness as harness_lib

    h = config.eval.harness
    loaded = check(config, workdir)
    mesh, g = build_generation_mesh(config), config.generate
    distilled = os.path.join(workdir, "model")
    builders = {"system1": lambda: build_system1(config, mesh, workdir),
                "distilled": lambda: (build_model(config, mesh, path=distilled, sampling=True),
                                      build_tokenizer(config, workdir))}
    out = {"meta": {"tasks": list(h.tasks), "limit": h.limit or None, "num_fewshot": h.num_fewshot,
                    "chat_template": h.chat_template}}
    samples = []
    for name in h.systems:
        common = dict(mesh=mesh, max_batch=g.max_batch, cache_dtype=g.cache_dtype or None)
        if name == "routed":
            lm = _routed(config, workdir, builders["distilled" if os.path.exists(distilled) else "system1"](),
                         mesh, common)
        else:
            lm = harness_lib.HarnessLM(*builders[name](), **common)
        log.info("harness: %s on %s", name, ", ".join(h.tasks))
        result = simple_evaluate(model=lm, tasks=list(loaded.values()), limit=h.limit or None,
                                 num_fewshot=None if h.num_fewshot < 0 else h.num_fewshot,
                                 apply_chat_template=h.chat_template and name != "routed", log_samples=True, random_seed=config.seed,
                                 numpy_random_seed=config.seed, torch_random_seed=config.seed,
                                 fewshot_random_seed=config.seed, bootstrap_iters=0)
        out[name] = {task: {k: v for k, v in metrics.items() if k != "alias" and isinstance(v, (int, float))}
                     for task, metrics in result["results"].items()}
        samples += [{"system": name, "task": task, "doc_id": s["doc_id"], "response": s["resps"][0][0],
                     "filtered": s["filtered_resps"][0], "filter": s.get("filter"),
                     "target": s["target"], **{m: s[m] for m in s if m.split(",")[0] in s.get("metrics", [])}}
                    for task, rows in result["samples"].items() for s in rows]
        if name == "routed":
            out["meta"]["routed"] = {**lm.decisions, "method": config.route.method,
                                     "threshold": config.route.threshold}
        for task, metrics in out[name].items():
            log.info("harness: %s %s: %s", name, task, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    path = os.path.join(workdir, OUT)
    if distributed.primary():
        write_atomic(os.path.join(workdir, "harness_samples.jsonl"),
                     "".join(json.dumps(r, default=str) + "\n" for r in samples))
        write_atomic(path, json.dumps(out, indent=2) + "\n")
    trackers.log(workdir, "harness", {system: {task: {k.replace(",", "/"): v for k, v in metrics.items()}
                                               for task, metrics in tasks_.items()}
                                      for system, tasks_ in out.items() if system != "meta"})
    distributed.barrier(f"harness {workdir}")
    return path


def _routed(config: ConfigDict, workdir: str, system1, mesh, common: dict):
    """The routed system (System 1: the distilled model, else the base) as a harness model, with the config's
    router, threshold, program and task."""
    from s2d_jax import harness as harness_lib
    from s2d_jax.stages.inputs import program_args, system1_target
    from s2d_jax.stages.route import router_args
    from s2d_jax.system2.programs import get_program
    from s2d_jax.system2.tasks import get_task

    from s2d_jax.relegation import rounds
    from s2d_jax.stages.route import router_state

    task = get_task(config.eval.task or config.task.name)
    path = os.path.join(workdir, "model") if os.path.exists(os.path.join(workdir, "model")) else \
        rounds.system1_path(workdir)
    name = os.path.relpath(path, rounds.root(workdir)) if path else "base"
    router = {k: v for k, v in router_args(config, task, mesh).items()
              if k in ("method", "samples", "temperature", "seed", "chat")}
    router.update(router_state(config, path, name, system1[0]))
    args = program_args(config, task)
    return harness_lib.RoutedHarnessLM(
        *system1, system2=build_system2(config, mesh, workdir), program=get_program(config.program.name), task=task,
        router=router, threshold=config.route.threshold, target=lambda a: system1_target(config, task, a),
        program_args=dict(chat=config.program.chat, budgets=args["budgets"], params=args["params"]), seed=config.seed,
        **common)
