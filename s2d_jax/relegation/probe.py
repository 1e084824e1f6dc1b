"""The probe router (`route.method=probe`): a logistic regression on System 1's own hidden state where its greedy
answer ends, beside cheap sequence features (mean and min token log-probability, answer length), predicting
whether that answer is the one System 2 would settle on. It costs one System 1 pass and no extra samples.

Trained per round without labels: its targets are whether System 1's greedy answer equals System 2's
self-consistent answer on the round's distillation examples that the model was not trained on (`held_out`:
`route.probe_holdout` of them, by id), the layer chosen by validation AUROC; saved with the round (`rounds/R/router/`: safetensors weights and a JSON of what they were trained
on), so `route` in the next round and `eval` in this one read the same probe."""

from __future__ import annotations

import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from s2d_jax.errors import S2DError

DIR = "router"
FIT = "train_fit.jsonl"  # with a probe: the examples the model trains on (the others train the probe)
WEIGHTS, META = "probe.safetensors", "probe.json"
STEPS, LEARNING_RATE, L2 = 300, 0.05, 1e-2


# ------------------------------------------------------------------------------------------ features


def features(model, tokenizer, prompts: list[str], samples: list, *, chat: bool, batch: int = 16) -> np.ndarray:
    """`[N, num_layers + 1, embed + 3]`: per input, the residual stream at every layer at the last token of its
    prompt and System 1's greedy answer (`samples`: the sampler's, with logprobs), each beside the answer's mean
    and min token log-probability and its length in tokens (log)."""
    from s2d_jax.tokenizer import chat_prompt

    rows = []
    for prompt, s in zip(prompts, samples):
        text = chat_prompt(tokenizer, prompt) if chat else prompt
        ids = tokenizer(text, add_special_tokens=not chat).input_ids + list(s.token_ids)
        rows.append(ids[:model.cfg.max_position_embeddings])
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda st, tok, seg, last: _at(nnx.merge(graphdef, st).residuals(tok, seg), last))
    states = []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        width = 1 << max(4, (max(len(r) for r in chunk) - 1).bit_length())
        tokens, segments = np.zeros((len(chunk), width), np.int32), np.zeros((len(chunk), width), np.int32)
        for j, r in enumerate(chunk):
            tokens[j, :len(r)], segments[j, :len(r)] = r, 1
        last = np.asarray([len(r) - 1 for r in chunk], np.int32)
        states.append(np.asarray(run(state, tokens, segments, last), np.float32))
    hidden = np.concatenate(states, axis=1).transpose(1, 0, 2)  # [N, L + 1, D]
    cheap = np.asarray([_cheap(s) for s in samples], np.float32)  # [N, 3]
    return np.concatenate([hidden, np.broadcast_to(cheap[:, None], (*hidden.shape[:2], 3))], axis=-1)


def _at(residuals, last):
    """Each row's residuals at its position `last`: `[L + 1, B, D]` in float32."""
    return jnp.take_along_axis(residuals, last[None, :, None, None], axis=2)[:, :, 0].astype(jnp.float32)


def _cheap(sample) -> list[float]:
    lps = list(sample.logprobs or []) or [0.0]
    return [float(np.mean(lps)), float(np.min(lps)), float(np.log1p(sample.num_tokens))]


def wanted(config) -> bool:
    """Whether the config routes by a probe (`route.method`) or sweeps one (`eval.routers`)."""
    return "probe" in (config.route.method, *config.eval.routers)


def held_out(example_id: str, share: float) -> bool:
    """Whether an example trains the probe instead of the model (`route.probe_holdout` of them, by id: the same in
    every round). A model answers the examples it was trained on as they were given to it, so only examples it
    never saw say whether its answers agree with System 2's."""
    return zlib.crc32(f"probe\x1f{example_id}".encode()) / 2 ** 32 < share


# ------------------------------------------------------------------------------------------ the probe


def train(x: np.ndarray, y: np.ndarray, ids: list[str], layer: int = -1) -> dict:
    """A probe on features `x` `[N, L + 1, F]` for targets `y` (1: System 1's answer agrees with System 2's): at
    `layer`, or (-1) the layer whose probe, trained on 80% of the inputs (split by id), ranks the other 20% best
    (AUROC; ties: the deeper layer); then trained on all. Deterministic: full-batch Adam from zeros."""
    from s2d_jax.relegation.routing import calibration

    if len(set(y.tolist())) < 2:  # one class (or none): the probe says the share that agreed
        return {"layer": x.shape[1] - 1 if layer < 0 else layer, "constant": float(y.mean()) if len(y) else 0.0,
                "validation": None}
    held = np.asarray([zlib.crc32(i.encode()) % 5 == 0 for i in ids])
    scores = {}
    for k in (range(x.shape[1]) if layer < 0 else [layer]):
        if layer < 0 and 0 < held.sum() < len(y) and len(set(y[~held].tolist())) == 2:
            fit = _fit(x[~held, k], y[~held])
            rows = [{"confidence": float(p), "correct": bool(t)} for p, t in zip(predict(fit, x[held, k]), y[held])]
            scores[k] = calibration(rows)["auroc"] or 0.0
        else:
            scores[k] = 0.0
    best = max(scores, key=lambda k: (scores[k], k))
    return {**_fit(x[:, best], y), "layer": best, "validation": scores[best] if layer < 0 else None}


def _fit(x: np.ndarray, y: np.ndarray) -> dict:
    mean, std = x.mean(0), x.std(0) + 1e-6
    z, t = jnp.asarray((x - mean) / std), jnp.asarray(y, jnp.float32)
    params = {"w": jnp.zeros(x.shape[1]), "b": jnp.asarray(np.log((y.mean() + 1e-3) / (1 - y.mean() + 1e-3)))}
    tx = optax.adam(LEARNING_RATE)

    def loss(p):
        logits = z @ p["w"] + p["b"]
        return optax.sigmoid_binary_cross_entropy(logits, t).mean() + L2 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, tx.init(p)), None, length=STEPS)[0][0]

    p = fit(params)
    return {"w": np.asarray(p["w"]), "b": float(p["b"]), "mean": mean, "std": std}


def predict(probe: dict, x: np.ndarray) -> np.ndarray:
    """The probability that System 1's answer is System 2's, per row of `x` `[N, F]` (the probe's layer)."""
    if "constant" in probe:
        return np.full(len(x), probe["constant"])
    z = (x - probe["mean"]) / probe["std"]
    return 1 / (1 + np.exp(-(z @ probe["w"] + probe["b"])))


# ------------------------------------------------------------------------------------------ with the round


def save(probe: dict, where: str, meta: dict) -> None:
    from safetensors.numpy import save_file

    from s2d_jax.artifacts import write_atomic

    out = os.path.join(where, DIR)
    os.makedirs(out, exist_ok=True)
    arrays = {k: np.asarray(probe[k], np.float32) for k in ("w", "mean", "std") if k in probe}
    if arrays:
        save_file(arrays, os.path.join(out, WEIGHTS) + ".tmp")
        os.replace(os.path.join(out, WEIGHTS) + ".tmp", os.path.join(out, WEIGHTS))
    info = {k: probe[k] for k in ("layer", "b", "constant", "validation") if k in probe}
    write_atomic(os.path.join(out, META), json.dumps({**meta, **info}, indent=2) + "\n")  # last: marks it complete


def load(where: str, model: str, layers: int) -> dict | None:
    """The probe saved in `where/router/` (None when there is none), checked against the System 1 it must watch
    (`model`, as the round names it) and its depth."""
    from safetensors.numpy import load_file

    path = os.path.join(where, DIR, META)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    if meta.get("system1") != model:
        raise S2DError(f"{path}: a probe trained on System 1 {meta.get('system1')!r}, not on {model!r} (the model it "
                       f"routes for); remove {os.path.dirname(path)} to train it again")
    if meta["layer"] > layers:
        raise S2DError(f"{path}: a probe on layer {meta['layer']} of a model with {layers} layers")
    probe = dict(meta)
    if "constant" not in meta:
        probe.update(load_file(os.path.join(where, DIR, WEIGHTS)))
    return probe
