"""`s2d plan`: per-device memory of a configured run, from shapes alone (no weights read, nothing allocated).

Parameters and AdamW moments are exact: every parameter's shard shape comes from the same logical-axis rules the
run uses. Full fine-tuning trains float32 masters (`model.dtype`); with LoRA the base weights are frozen in the
compute dtype and only the float32 adapters have gradients and moments. The KV cache is exact for the sampler's
largest batch (`generate.max_batch` rows, the longest prompt bucket plus the largest stage budget). Training
activations are an estimate from what our step saves for the backward pass (below): attention is blockwise/flash
(no `[T, T]` scores kept) and the loss is chunked (one chunk's logits at a time). Checked against XLA's memory
analysis of the compiled step (`tests/test_plan.py`) and calibrated on XLA:TPU's compiled peaks of the paper
configs at 8B (`s2d plan` with `plan.topology`, `s2d_jax/plan/aot.py`; README, "Compiled for the TPU"). The plan fails
early, with advice, when a total exceeds `plan.device_gb`.
"""

from __future__ import annotations

import logging
import math
import types

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from s2d_jax import mesh as mesh_lib
from s2d_jax.runtime import memory
from s2d_jax.config import teacher_config
from s2d_jax.runtime.distributed import device_bytes
from s2d_jax.errors import REMEDIES, S2DError
from s2d_jax.model import PRESETS, Transformer, hub, read_config
from s2d_jax.model.transformer import cache_slots
from s2d_jax.sampling.cache import CACHE_AXES, length_bucket, row_chunks, width_bucket
from s2d_jax.system2.programs import get_program

GB = 1 << 30
log = logging.getLogger("s2d")


def mesh_shape(m: ConfigDict, devices: int):
    """The (data, fsdp, tensor) mesh of `devices` devices as shapes only, as `make_mesh` would lay it out; the
    plan needs no real devices, so a laptop can plan a TPU pod."""
    return types.SimpleNamespace(shape=mesh_lib.mesh_sizes(m.data, m.fsdp, m.tensor, devices), size=devices)


def model_config(config: ConfigDict, system2: bool = False):
    """The student's model config (trained, System 1); with `system2`, the model that samples System 2's rollouts:
    the `teacher` when there is one (in its own dtype), else the same model."""
    if system2 and (teacher := teacher_config(config)) is not None:
        return model_config(teacher)
    m = config.model
    base = read_config(hub.resolve(m.path, m.revision, config_only=True)) if m.path else PRESETS.get(m.preset)
    if base is None:
        raise S2DError(f"config key 'model.preset': {m.preset!r} is not a preset and 'model.path' is empty")
    compute = m.compute_dtype or m.dtype
    return base.replace(param_dtype=m.dtype, dtype=compute, remat=config.train.remat, scan_layers=m.scan_layers,
                        attention=m.attention, splash_block=m.splash_block)


def shard_bytes(shape, dtype, axes, mesh) -> int:
    """Bytes of one device's shard of an array laid out by the logical rules."""
    spec = mesh_lib.partition_spec(axes, shape, mesh)
    count = 1
    for dim, part in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if part is None else (part,) if isinstance(part, str) else part
        count *= dim // math.prod(mesh.shape[n] for n in names)
    return count * np.dtype(dtype).itemsize


def _state_bytes(state, mesh, dtype=None) -> int:
    return sum(shard_bytes(v.shape, dtype or v.dtype, mesh_lib.param_axes(v), mesh)
               for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def sampler_shapes(config: ConfigDict, cfg, row_multiple: int) -> dict:
    """The sampler's largest shapes, as the engine would meet them: `slots` (generate.max_batch, rounded up to a
    multiple of the data shards), the largest prompt bucket (the longest task input, assumed <= train.max_len),
    the largest stage budget, the cache `width` they reach (cache.width_bucket, within the context) and the
    prefill `rows` of a full insert's largest chunk (each prompt takes `generate.samples` slots; cache.row_chunks)."""
    g, p = config.generate, config.program
    ctx = cfg.max_position_embeddings
    budget = max(get_program(p.name).budgets(p.max_new_tokens, p.stage_tokens).values()) if p.name else (
        p.max_new_tokens or 256)
    slots = -(-g.max_batch // row_multiple) * row_multiple
    prompt = max(min(length_bucket(config.train.max_len, 32), ctx - budget), 1)
    width = min(width_bucket(prompt + budget), ctx)
    rows = row_chunks(-(-slots // g.samples), row_multiple)[0]
    return {"slots": slots, "prompt": prompt, "budget": budget, "width": width, "rows": rows}


def gathered_head(cfg, tensor: int, fsdp: int) -> int:
    """The output head (vocab x embed, compute dtype) as FSDP gathers it whole for the logits; 0 without FSDP."""
    return cfg.vocab_size * cfg.hidden_size * np.dtype(cfg.dtype).itemsize // tensor if fsdp > 1 else 0


def sampler_transient(cfg, s: dict, mesh) -> int:
    """Estimated working set of the sampler's programs on one device beyond weights and the slots' cache: with
    FSDP, one layer's weights and the output head gathered; then the larger of a decode step's logits (float32,
    and their softmax) over the slots and a full insert's prefill (its new cache rows and a layer's activations).
    Tensor parallelism splits a layer's heads and MLP units, not its hidden-sized activations: every chip holds the
    residual stream, the norm's float32 copies, the normed input and a block's output before and after its
    all-reduce (hidden x (4 x dtype bytes + 8) a token; they were counted split, and `bsm_mt_bench`'s 2,048-token
    prefill on a v5e-8 came out 0.39 GB for XLA's 1.38)."""
    b = np.dtype(cfg.dtype).itemsize
    tensor, shards = mesh.shape["tensor"], mesh.shape["data"] * mesh.shape["fsdp"]
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    gathered = (cfg.num_params - embed) // cfg.num_layers * b // tensor if mesh.shape["fsdp"] > 1 else 0
    gathered += gathered_head(cfg, tensor, mesh.shape["fsdp"])
    decode = 2 * -(-s["slots"] // shards) * cfg.vocab_size * 4 // tensor
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * b // tensor
    layer = cfg.hidden_size * (4 * b + 8) + (3 * cfg.intermediate_size + 2 * (cfg.num_heads + cfg.num_kv_heads)
                                              * cfg.head_dim) * b // tensor
    prefill = -(-s["rows"] // shards) * (s["prompt"] * (kv + layer) + cfg.vocab_size * 4)
    return gathered + max(decode, prefill)


def activation_bytes(cfg, rows: int, length: int, chunk: int, tensor: int = 1, fsdp: int = 1) -> int:
    """Estimated peak bytes of a train step's activations on one device for `rows` x `length` tokens: what the
    backward pass keeps per layer, one layer's transient working set, one loss chunk's logits, and the
    blockwise attention's score blocks; with FSDP, the output head gathered whole for the loss. Per token and
    layer the step keeps, in the compute dtype, the layer input, the two norm outputs, q/k/v (before and after
    RoPE), the attention output, the MLP's gate/up/product and the residual sums (about 6d + 2(h + 2k)hd + 2h hd +
    4i values) and a float32 log-sum-exp per head; `dots` remat keeps only the matmul outputs, `full` only the
    layer input (and recomputes one layer at a time). Checked against XLA:TPU's compiled peaks (`s2d plan` with
    `plan.topology`): the gathered head (1 GB at 8B) was what the estimate missed."""
    from s2d_jax.model.attention import BLOCK

    d, h, k, hd, i = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    b = np.dtype(cfg.dtype).itemsize
    tokens = rows * length
    layer = (6 * d + 2 * (h + 2 * k) * hd + 2 * h * hd + 4 * i) * b // tensor + 4 * h
    saved = {"none": layer, "dots": ((h + 2 * k) * hd + 2 * i + 2 * d) * b // tensor, "full": d * b}[cfg.remat]
    scores = 3 * rows * h * length * min(BLOCK, length) * 4 // tensor  # s, p, ds of one key block, float32
    logits = 2 * rows * (chunk or length) * cfg.vocab_size * 4 // tensor  # a chunk's logits and their gradient
    head = gathered_head(cfg, tensor, fsdp)
    transient = max(tokens * layer + scores, logits + head + tokens * d * 4)
    return tokens * cfg.num_layers * saved + tokens * d * (b + 4) + transient


def generation_shape(config: ConfigDict, devices: int, per_host: int, platform: str, device_bytes: float):
    """The generation mesh (`generate.mesh` resolved for `devices` devices of `platform`, `mesh.generation_sizes`) as
    shapes only, for every model that samples on it: System 1 (route, eval) and the model that runs System 2 (the
    teacher, if any). Reads config.json only."""
    m, g = config.mesh, config.generate.mesh
    cfgs = [model_config(config)]
    if teacher_config(config) is not None:
        cfgs.append(model_config(config, system2=True))
    sizes = mesh_lib.generation_sizes(dict(data=g.data, fsdp=g.fsdp, tensor=g.tensor),
                                      dict(data=m.data, fsdp=m.fsdp, tensor=m.tensor), cfgs, devices,
                                      min(per_host, devices), platform, device_bytes)
    return types.SimpleNamespace(shape=sizes, size=devices)


def sampling_state(cfg, weights_dtype: str = ""):
    """The sampler's weights as abstract arrays: in the compute dtype, the projections in `weights_dtype`."""
    from s2d_jax.model import quant

    build = lambda: quant.quantize(Transformer(cfg.replace(param_dtype=cfg.dtype), rngs=nnx.Rngs(0)), weights_dtype)
    return nnx.split(nnx.eval_shape(build))[1]


def plan(config: ConfigDict, mesh, gen=None) -> dict:
    """Per-device bytes: training on `mesh`, generation on `gen` (the generation mesh; default `mesh`)."""
    from s2d_jax.model import lora

    cfg = model_config(config)
    t = config.train

    def build():
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        return lora.add(model, t.lora_rank, t.lora_alpha, t.lora_targets) if t.lora_rank else model

    _, adapter_state, base_state = nnx.split(nnx.eval_shape(build), lora.LoRAParam, nnx.Param)
    if t.lora_rank:  # base frozen in the compute dtype; float32 adapters are what trains
        trained = _state_bytes(adapter_state, mesh)
        params = _state_bytes(base_state, mesh, cfg.dtype) + trained
    else:
        params = trained = _state_bytes(base_state, mesh)
    rows_split = mesh.shape["data"] * mesh.shape["fsdp"]
    gen = gen or mesh
    sampler = model_config(config, system2=True)  # what samples the rollouts: the teacher, if any
    sample_state = sampling_state(sampler, config.generate.weights_dtype)
    sample_params = _state_bytes(sample_state, gen)
    # what a step reads of them: an untied input embedding only at the rows it looks up (nothing, to a byte count)
    sample_read = sample_params - (0 if sampler.tie_embeddings else _state_bytes(sample_state["embed"], gen))
    s = sampler_shapes(config, sampler, gen.shape["data"] * gen.shape["fsdp"])
    kv_shape = (s["slots"], sampler.num_kv_heads, s["width"], sampler.head_dim)
    length = s["width"]
    kv_dtype = config.generate.cache_dtype or sampler.dtype

    def kv_bytes(width: int) -> int:  # keys and values of every layer (an int8 one: and a float32 scale a vector)
        shapes = [kv_shape[:2] + (cache_slots(sampler, n, width),) + kv_shape[3:] for n in range(sampler.num_layers)]
        out = sum(shard_bytes(shape, kv_dtype, CACHE_AXES, gen) for shape in shapes)
        if kv_dtype == "int8":
            out += sum(shard_bytes(shape[:3], "float32", CACHE_AXES, gen) for shape in shapes)
        return 2 * out

    kv = kv_bytes(length)  # sliding layers hold a ring of their window
    kv_live = kv_bytes(min(s["prompt"] + s["budget"], length))  # the longest sequence: what a step must read
    micro_rows = max(t.batch_size // t.grad_accum // rows_split, 1)
    activations = activation_bytes(cfg, micro_rows, t.max_len, t.loss_chunk, mesh.shape["tensor"], mesh.shape["fsdp"])
    train_total = params + trained * 3 + activations  # weights, gradients, two AdamW moments (float32 masters)
    return {"mesh": dict(mesh.shape), "generate_mesh": dict(gen.shape), "devices": mesh.size,
            "num_params": cfg.num_params,
            "generate_num_params": sampler.num_params, "lora_rank": t.lora_rank, "params": params,
            "grads": trained, "optimizer": 2 * trained, "activations_estimate": activations, "train_total": train_total,
            "kv_cache": kv, "kv_cache_shape": list(kv_shape), "kv_live": kv_live, "generate_params": sample_params,
            "generate_params_read": sample_read,
            "sampler_transient": (transient := sampler_transient(sampler, s, gen)),
            "generate_total": sample_params + kv + transient, "device_gb": config.plan.device_gb}


def advice(p: dict, config: ConfigDict) -> list[str]:
    """What does not fit `device_gb` per device: by the estimate, or by XLA where the programs were compiled."""
    limit = p["device_gb"] * GB
    out = []
    for kind in ("train", "generate"):
        need = p.get(f"{kind}_compiled", p[f"{kind}_total"])
        if need > limit:
            how = f"compiled for {p['target']['name']}" if f"{kind}_compiled" in p else "by the estimate"
            out.append(f"{kind} needs {need / GB:.2f} GB per device ({how}), over {p['device_gb']} GB: "
                       f"{REMEDIES[kind]}")
    return out


def report(p: dict) -> str:
    lines = [f"mesh {p['mesh']} ({p['devices']} devices), {p['num_params'] / 1e6:.1f}M parameters; per device:"]
    if p["lora_rank"]:
        lines[0] += f" (LoRA rank {p['lora_rank']}: frozen base + float32 adapters)"
    if p["generate_mesh"] != p["mesh"]:
        lines.append(f"  (generation mesh {p['generate_mesh']}: generate_*, kv_cache, sampler_transient and the "
                     f"prefill, insert and decode programs)")
    if p["generate_num_params"] != p["num_params"]:
        lines.append(f"  (generate's figures are the teacher's: {p['generate_num_params'] / 1e6:.1f}M parameters)")
    for key in ("params", "grads", "optimizer", "activations_estimate", "train_total", "generate_params", "kv_cache",
                "sampler_transient", "generate_total"):
        lines.append(f"  {key:<21} {p[key] / GB:10.4f} GB")
    if "compiled" in p:
        lines += compiled_report(p)
    return "\n".join(lines)


def compiled_report(p: dict) -> list[str]:
    t, e = p["target"], p["roofline_estimate"]
    lines = [f"compiled for {t['name']} ({t['chips']} x {t['device_kind']}, {t['hbm_gb']:g} GB each, "
             f"{t['hosts']} host{'s' * (t['hosts'] > 1)}); XLA's figures per chip, GB:",
             f"  {'program':<11} {'arguments':>9} {'temps':>8} {'outputs':>8} {'aliased':>8} {'peak':>8} "
             f"{'compile s':>9}  collectives"]
    for name, c in p["compiled"].items():
        if "peak" not in c:  # a prefill bucket's costs only
            continue
        ops = ", ".join(f"{k} {v}" for k, v in c["collectives"].items()) or "none"
        lines.append(f"  {name:<11} " + " ".join(f"{c[k] / GB:{w}.3f}" for k, w in (
            ("arguments", 9), ("temporaries", 8), ("outputs", 8), ("aliases", 8), ("peak", 8)))
            + f" {c['compile_s']:9.1f}  {ops}")
    for kind in ("train", "generate"):
        est, comp = p[f"{kind}_total"], p[f"{kind}_compiled"]
        lines.append(f"  {kind:<8} estimate {est / GB:7.2f} GB, compiled {comp / GB:7.2f} GB "
                     f"(estimate / compiled {est / comp:.2f})")
    if e is None:
        return lines + ["roofline: none (XLA compiled for this GPU without one gives no cost analysis)"]
    lines += rates_report(p)
    lines.append(f"roofline estimate from XLA's FLOPs and bytes (not a measurement): train step "
                 f"{e['train_step_s']:.3f} s ({e['train_tokens_per_s']:,.0f} tokens/s), decode step "
                 f"{e['decode_step_s'] * 1e3:.2f} ms ({e['decode_tokens_per_s']:,.0f} tokens/s at "
                 f"{e['decode_slots']} slots; by HBM bytes alone {e['decode_hbm_step_s'] * 1e3:.2f} ms, "
                 f"{e['decode_hbm_tokens_per_s']:,.0f} tokens/s), prefill {e['prefill_s'] * 1e3:.1f} ms")
    return lines


def rates_report(p: dict) -> list[str]:
    """The sampler's programs against the chip: XLA's roofline and the HBM-only one (`plan.hbm`: only bytes with
    an end in HBM) beside the floor (the bytes a step must read over HBM bandwidth; a prefill's FLOPs over peak
    where larger), and tokens/s over the slice by each roofline."""
    lines = [f"  {'program':<12} {'mesh d/f/t':>10} {'rows':>6} {'floor ms':>9} {'XLA roofline ms':>15} "
             f"{'floor/XLA':>9} {'tokens/s':>10} {'HBM roofline ms':>15} {'floor/HBM':>9} {'tokens/s':>10}"]
    for name, c in p["compiled"].items():
        if "hbm_floor_s" not in c or c["roofline_s"] is None:
            continue
        m = c["mesh"]
        floor = max(c["hbm_floor_s"], c.get("compute_floor_s", 0.0))
        lines.append(f"  {name:<12} {m['data']:>4}/{m['fsdp']}/{m['tensor']:<3} {c.get('slots', c.get('rows')):>6} "
                     f"{floor * 1e3:9.2f} {c['roofline_s'] * 1e3:15.2f} {c['floor_over_roofline']:9.2f} "
                     f"{c['tokens_per_s']:10,.0f} {c['hbm_roofline_s'] * 1e3:15.2f} "
                     f"{c['floor_over_hbm_roofline']:9.2f} {c['hbm_tokens_per_s']:10,.0f}")
    return lines


# ------------------------------------------------------------------------------------------ against the devices here

CERTAIN = 1.5  # the plan's figure over what the devices hold by this factor: refused before any work (else warned)


def explain(config: ConfigDict, e: memory.OutOfMemory) -> str:
    """The one line: what ran out, then the plan's figures for this config on the devices at hand, and its advice."""
    try:
        p = _plan(config)
    except S2DError:
        return f"{e}; see `s2d plan` for this config"
    kind = "train" if "train" in e.program else "generate"
    return (f"{e}; `s2d plan` for this config on {p['devices']} devices: {kind} needs "
            f"{p[kind + '_total'] / GB:.2f} GB per device; {REMEDIES[kind]}")


def check_fits(config: ConfigDict, stage: str) -> None:
    """Before any work: refuse a stage whose plan is far over the memory of the devices at hand; warn when near."""
    kinds = {"train": ("train",), "generate": ("generate",), "eval": ("generate",), "filter": (),
             "run": ("generate", "train")}.get(stage, ())
    if not kinds or not (config.model.path or config.model.preset):
        return
    p, limit = _plan(config), device_bytes()
    for kind in kinds:
        need = p[kind + "_total"]
        if need > CERTAIN * limit:
            raise S2DError(f"{kind} needs {need / GB:.2f} GB per device by `s2d plan`, and the {p['devices']} "
                           f"device(s) here hold {limit / GB:.2f} GB each; {REMEDIES[kind]}")
        if need > limit:
            log.warning("%s needs %.2f GB per device by `s2d plan`, over the %.2f GB each device here holds: it may "
                        "run out of memory (%s)", kind, need / GB, limit / GB, REMEDIES[kind])


def _plan(config: ConfigDict) -> dict:
    """The plan of `config` on the devices at hand (its meshes as the stages resolve them)."""
    devices = len(mesh_lib.mesh_devices(config))
    gen = generation_shape(config, len(mesh_lib.generation_devices(config)), jax.local_device_count(),
                           jax.default_backend(), device_bytes())
    return plan(config, mesh_shape(config.mesh, devices), gen)
