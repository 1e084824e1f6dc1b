"""The run's device programs on abstract arrays, built by the code the stages run (for `s2d_jax.plan.aot`).

Each function takes the `aot.Programs` of a target and a model config, and returns `(jitted function, args,
kwargs)` to lower: arguments are `ShapeDtypeStruct`s laid out on the target's mesh as the stages lay them out
(parameters by the logical-axis rules, batches and slots by rows), so what compiles is what would run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from s2d_jax import mesh as mesh_lib
from s2d_jax.model import lora as lora_lib, quant
from s2d_jax.model.transformer import Transformer
from s2d_jax.sampling import cache as cache_lib, engine, layouts
from s2d_jax.sampling.select import make_method
from s2d_jax.train import data as data_lib


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _split(state, mesh):
    """A state as abstract arrays, each laid out by its parameters' logical axes (a pure dict)."""
    return _abstract(state.to_pure_dict(), mesh_lib.state_shardings(state, mesh).to_pure_dict())


def _rows(shape, dtype, mesh):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.named_sharding(
        ("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def train_step(programs, cfg):
    """The trainer's step (`trainer.step_program`) on a global batch `[grad_accum, rows, max_len]`: with LoRA the
    base frozen in the compute dtype and float32 adapters, else float32 masters (`model.dtype`)."""
    from s2d_jax.train.trainer import batch_sharding, make_optimizer, optimizer_shardings, step_program

    t, mesh = programs.config.train, programs.mesh
    cfg = cfg.replace(remat=t.remat, param_dtype=cfg.dtype if t.lora_rank else cfg.param_dtype)

    def build():
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        return lora_lib.add(model, t.lora_rank, t.lora_alpha, t.lora_targets) if t.lora_rank else model

    graphdef, trainable, frozen = lora_lib.split_trainable(nnx.eval_shape(build))
    tx = make_optimizer(t)
    params = _split(trainable, mesh)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = optimizer_shardings(tx, params, param_shardings, mesh)
    opt_state = _abstract(jax.eval_shape(tx.init, params), opt_shardings)
    micro = t.batch_size // t.grad_accum
    shape, rows = (t.grad_accum, micro, t.max_len), batch_sharding(mesh, micro)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32, sharding=rows)
             for k in (*data_lib.FIELDS, "segment_ids", "positions")}
    step = step_program(graphdef, tx, t, param_shardings, opt_shardings)
    return step, (params, opt_state, batch, None if frozen is None else _split(frozen, mesh)), {}


def _sampler(programs, cfg, laid: bool = False):
    """The sampler's model (weights in the compute dtype, split as `Sampler` splits it) and its largest shapes.
    `laid`: the weights in the layouts the decode program chose, as the sampler lays them out (layouts.py)."""
    from s2d_jax.plan.estimate import sampler_shapes

    mesh = programs.gen
    cfg = cfg.replace(param_dtype=cfg.dtype)
    dtype = programs.config.generate.weights_dtype
    graphdef, state = nnx.split(nnx.eval_shape(lambda: quant.quantize(Transformer(cfg, rngs=nnx.Rngs(0)), dtype)))
    state = _abstract(state, mesh_lib.state_shardings(state, mesh))
    if laid and _auto_layouts(programs, cfg):
        formats = programs.compiled("decode", cfg).input_formats[0][0]
        state = jax.tree.map(lambda x, f: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=f), state, formats)
    return cfg, graphdef, state, sampler_shapes(programs.config, cfg, mesh.shape["data"] * mesh.shape["fsdp"])


def held_twice(programs, cfg) -> int:
    """Bytes per chip of the weights the sampler keeps a second copy of in the decode's layouts (layouts.py)."""
    if not _auto_layouts(programs, cfg):
        return 0
    _, _, state, _ = _sampler(programs, cfg)
    return layouts.held_twice(state, programs.compiled("decode", cfg).input_formats[0][0])


def _auto_layouts(programs, cfg) -> bool:
    """Whether the decode leaves its weights' layouts to XLA, as the sampler does on this platform: in the run's
    own program only. The shorter unscanned copies `Programs.costs` compiles keep the default layouts: with AUTO,
    XLA lays their unstacked weights out for another program, whose cost analysis counted 1.8x the bytes a layer
    (llama3-8b, v5p-64), where the run's scanned program costs the same a layer either way (its bytes accessed
    4.63 GB against 4.67 GB once the per-call copy is taken out)."""
    run = programs.sampler
    return (programs.t.platform in layouts.PLATFORMS and cfg.num_layers == run.num_layers
            and cfg.scan_layers == run.scan_layers)


def prefill(programs, cfg, prompt: int = 0):
    """A full insert's prefill: `rows` prompts left-padded to the largest prompt bucket, or to `prompt`
    (`cache.prefill`)."""
    _, graphdef, state, s = _sampler(programs, cfg, laid=True)
    prompt = prompt or s["prompt"]
    ids = _rows((s["rows"], prompt), jnp.int32, programs.gen)
    return cache_lib.prefill, (graphdef, state, ids, ids, ids), {"max_len": prompt,
                                                                 "dtype": _cache_dtype(programs, cfg)}


def _cache_dtype(programs, cfg) -> str:
    return str(jnp.dtype(programs.config.generate.cache_dtype or cfg.dtype))


def _shape(programs, cfg, s) -> engine.Shape:
    return engine.Shape(s["slots"], cache_lib.bucket(s["budget"], 16), cfg.num_kv_heads, cfg.head_dim,
                        cfg.vocab_size, _cache_dtype(programs, cfg), 0)


def empty(programs, cfg):
    """The engine's slots at the widest cache the run reaches (`engine.empty`)."""
    cfg, _, _, s = _sampler(programs, cfg)
    return engine.empty, (_shape(programs, cfg, s), cache_lib.layer_sizes(cfg, s["width"])), {}


def insert(programs, cfg):
    """The prefilled rows copied into every slot (`engine.insert`)."""
    _, _, _, s = _sampler(programs, cfg)
    logits, cache = programs.outputs("prefill", cfg)
    n, mesh = s["slots"], programs.gen
    index = _rows((n,), jnp.int32, mesh)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), n))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=index.sharding)
    return engine.insert, (programs.outputs("empty", cfg), logits, cache, index, index, index, keys), {
        "pad_id": 0}


def decode(programs, cfg):
    """One decode chunk of every slot at the widest cache (`engine.decode`, sampling as the config samples)."""
    _, graphdef, state, s = _sampler(programs, cfg)
    g = programs.config.generate
    method = make_method(g.temperature, g.top_k or None, g.top_p if g.top_p < 1 else None)
    steps, slots = jax.ShapeDtypeStruct((), jnp.int32), programs.outputs("empty", cfg)
    static = {"method": method, "eos_ids": tuple(cfg.eos_token_ids) or (0,), "pad_id": 0}
    if _auto_layouts(programs, cfg):  # the weights' layouts left to XLA, as the sampler asks on this platform
        program = layouts.auto_decode(graphdef, layouts.shardings(state), layouts.shardings(slots), **static)
        return program, (state, slots, steps), {}
    return engine.decode, (graphdef, state, slots, steps), static
