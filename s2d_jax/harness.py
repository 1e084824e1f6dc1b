"""lm-evaluation-harness over our model: `HarnessLM` answers the harness's requests through our sampler
(`generate_until`, batched in the engine) and the model's forward pass (`loglikelihood`, `loglikelihood_rolling`),
with the chat template applied as the harness asks. `tasks` resolves task names, task YAML files in
`eval.harness.include_path` (their `data_files` may name registry data: `data:NAME`), and stock tasks whose data
our registry holds (read from the registry, never the network)."""

from __future__ import annotations

import difflib
import functools
import os
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM

from s2d_jax.errors import S2DError
from s2d_jax.sampling import Sampler
from s2d_jax.sampling.select import argmax

# Stock harness tasks whose data the registry holds: the task's own YAML, with its dataset read from our files
REGISTRY_DATA = {
    "gsm8k": {"dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {"train": "data:gsm8k_train", "test": "data:gsm8k_test"}}},
}


class HarnessLM(TemplateLM):
    """An `lm_eval` model over a `Transformer` and its tokenizer. Greedy generation stops at the harness's `until`
    strings and `max_gen_toks`; log-likelihoods come from one jitted forward pass per batch of rows padded to a
    power-of-two length."""

    def __init__(self, model, tokenizer, *, mesh=None, max_batch: int = 32, cache_dtype: str | None = None):
        super().__init__()
        self.model, self.tok = model, tokenizer
        self.sampler = Sampler(model, tokenizer, mesh=mesh, max_batch=max_batch, cache_dtype=cache_dtype)
        self.max_batch, self.templated = max_batch, False
        self.limit = model.cfg.max_position_embeddings
        graphdef, state = nnx.split(model)
        self._scores = jax.jit(functools.partial(_token_scores, graphdef))
        self._state = state

    # ---- what the harness asks of a chat model
    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tok, "name_or_path", "s2d").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tok, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        self.templated = True  # the harness templates the contexts: read them without adding special tokens
        return self.tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                            continue_final_message=not add_generation_prompt)

    # ---- TemplateLM's tokenization
    @property
    def eot_token_id(self) -> int:
        return self.sampler.eos_ids[0] if self.sampler.eos_ids else self.tok.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tok.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = (not self.templated) if add_special_tokens is None else add_special_tokens
        return self.tok(string, add_special_tokens=special).input_ids

    # ---- requests
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups = defaultdict(list)  # requests with the same generation arguments run in one sampler call
        for i, r in enumerate(requests):
            context, kwargs = r.args
            groups[_key(kwargs)].append((i, context))
        for key, items in groups.items():
            kwargs = dict(key)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            samples = self.sampler.generate([c for _, c in items], max_new_tokens=budget, temperature=temperature,
                                            stop=until or None, chat="templated" if self.templated else False,
                                            progress=not disable_tqdm)
            for (i, _), (s,) in zip(items, samples):
                text = s.text
                for u in until:  # the harness cuts at the first stop string, as its HF model does
                    text = text.split(u)[0]
                out[i] = text
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Per (context tokens, continuation tokens): the continuation's summed log-probability and whether it is
        the greedy continuation; the context is cut from the left to fit the model's positions."""
        rows = []
        for _, ctx, cont in requests:
            whole = (ctx + cont)[-(self.limit + 1):]
            rows.append((whole[:-1], len(cont), whole[1:]))
        results: list[tuple[float, bool]] = []
        for start in range(0, len(rows), self.max_batch):
            batch = rows[start:start + self.max_batch]
            width = 1 << max(4, (max(len(r[0]) for r in batch) - 1).bit_length())
            tokens = np.zeros((len(batch), width), np.int32)
            targets = np.zeros((len(batch), width), np.int32)
            segments = np.zeros((len(batch), width), np.int32)
            for j, (inp, _, tgt) in enumerate(batch):
                tokens[j, :len(inp)], targets[j, :len(tgt)], segments[j, :len(inp)] = inp, tgt, 1
            lp, greedy = jax.device_get(self._scores(self._state, jnp.asarray(tokens), jnp.asarray(targets),
                                                     jnp.asarray(segments)))
            for j, (inp, n, _) in enumerate(batch):
                span = slice(len(inp) - n, len(inp))
                results.append((float(lp[j, span].sum()), bool(greedy[j, span].all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for r in requests:
            (text,) = r.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text, add_special_tokens=False), self.prefix_token_id, self.limit, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(s for s, _ in scores))
        return out


class RoutedHarnessLM(HarnessLM):
    """The routed system as a harness model: System 1 answers each request with its confidence (`route.method`);
    where it is not sure (`route.threshold`), System 2's program answers instead, in the form System 1 was
    distilled to give. Contexts are read as the question, with our chat template per call, as `s2d eval` does
    (`eval.harness.chat_template` does not apply to it). Log-likelihoods are System 1's. `decisions` counts what was
    escalated."""

    def __init__(self, model, tokenizer, *, system2, program, task, router: dict, threshold: float, target,
                 program_args: dict, seed: int = 0, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.system2 = Sampler(*system2, mesh=kwargs.get("mesh"), max_batch=self.max_batch,
                               cache_dtype=kwargs.get("cache_dtype"))
        self.program, self.task, self.router, self.threshold = program, task, router, threshold
        self.target, self.program_args, self.seed = target, program_args, seed
        self.decisions = {"requests": 0, "escalated": 0}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from s2d_jax import evaluate
        from s2d_jax.relegation import routing
        from s2d_jax.system2.programs import run_program
        from s2d_jax.system2.tasks import Example

        out: list[str | None] = [None] * len(requests)
        groups = defaultdict(list)
        for i, r in enumerate(requests):  # a document's own `id` keys its router samples, as in `s2d eval`
            doc_id = r.doc.get("id") if isinstance(r.doc, dict) and "id" in r.doc else f"{r.task_name}:{r.doc_id}"
            groups[_key(r.args[1])].append((i, Example(str(doc_id), r.args[0])))
        for key, items in groups.items():
            kwargs = dict(key)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            examples = [e for _, e in items]
            rows, _ = evaluate.router(self.model, self.tok, self.task, examples, prompt=lambda e: e.input,
                                      max_new_tokens=int(kwargs.get("max_gen_toks", 256)), stop=until or None,
                                      **self.router)
            up = [k for k, row in enumerate(rows) if routing.escalated(row["confidence"], self.threshold)]
            records = run_program(self.program, [examples[k] for k in up], self.system2, 1, parse=self.task.parse,
                                  seed=self.seed, progress=False, temperature=0.0, **self.program_args)
            texts = [row["text"] for row in rows]
            for k, record in zip(up, records):
                texts[k] = self.target(record["answer"]) if record["answer"] is not None else record["stages"][-1][
                    "output"]
            for (i, _), text in zip(items, texts):
                for u in until:
                    text = text.split(u)[0]
                out[i] = text
            self.decisions["requests"] += len(items)
            self.decisions["escalated"] += len(up)
        return out


def _token_scores(graphdef, state, tokens, targets, segments):
    """Each position's log-probability of its target token, and whether that token is the argmax."""
    model = nnx.merge(graphdef, state)
    logits = model(tokens, segment_ids=segments)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return picked, argmax(logits) == targets


def _key(kwargs: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (kwargs or {}).items()))


# ------------------------------------------------------------------------------------------ tasks


@functools.cache
def tasks(names: tuple[str, ...], include_path: str = "") -> dict:
    """The harness's tasks for `names`, loaded with their data: a registered name (a stock task, its data from our
    registry where `REGISTRY_DATA` maps it), or the name of a task in `include_path`'s YAML files. One line for an
    unknown name, and for a task whose data cannot be read here (the network is only for our registry)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if include_path and not os.path.isdir(include_path):
        raise S2DError(f"config key 'eval.harness.include_path': {include_path}: no such directory")
    manager = _manager(include_path)
    specs = []
    for name in names:
        entry = manager.task_index.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5)
            raise S2DError(f"config key 'eval.harness.tasks': no harness task {name!r}"
                           + (f" (close: {', '.join(close)})" if close else ""))
        cfg = load_yaml(entry.yaml_path) if entry.yaml_path else {}
        cfg.update(REGISTRY_DATA.get(name, {}))
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if files is not None and _registry_names(files):  # data named as our registry names it: read from there
            cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": _resolved(files)}
            specs.append(cfg)
        else:
            specs.append(name)
    loaded = {}
    for name, spec in zip(names, specs):
        try:
            loaded.update(manager.load([spec])["tasks"])
        except Exception as e:  # noqa: BLE001 (the datasets library's errors: offline, missing files, bad YAML)
            why = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise S2DError(f"config key 'eval.harness.tasks': harness task {name!r}: its data cannot be read here "
                           f"({why}); tasks with data in the registry: {', '.join(REGISTRY_DATA)}, or a task YAML "
                           f"in eval.harness.include_path over local files") from None
    return loaded


@functools.cache
def _manager(include_path: str):
    """The harness's task index (stock tasks and `include_path`'s): seconds to build, so once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path or None)


def _registry_names(files) -> list[str]:
    """The `data:` names in a task's `data_files` (a string, a list, or a dict of splits)."""
    if isinstance(files, str):
        return [files] if files.startswith("data:") else []
    values = files.values() if isinstance(files, dict) else files
    return [n for v in values for n in _registry_names(v)]


def _resolved(files):
    from s2d_jax import datasets

    if isinstance(files, str):
        return datasets.resolve(files)
    if isinstance(files, dict):
        return {k: _resolved(v) for k, v in files.items()}
    return [_resolved(v) for v in files]
