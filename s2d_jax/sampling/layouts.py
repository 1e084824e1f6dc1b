"""The generation weights in the layouts the decode program asks for.

XLA chooses the physical layout of every array inside a program but takes the program's arguments as they come.
On a v5p-64 (generation mesh data 8 x tensor 4, 8 rows a chip) XLA:TPU streams each layer's QKV weight through
VMEM with the embedding dimension minor, so the Llama-3-8B decode copied the whole stacked QKV shard into that
layout at the start of every call (0.40 GB a chip; `s2d plan`'s HLO). On the platforms in `PLATFORMS` the sampler
compiles its first decode with `Layout.AUTO` for the weights (once per process and model), which says what the
program wants, and keeps a copy of each weight whose wanted layout differs (the model's own arrays are left as
training has them): every program it compiles after takes the weights as they are (JAX compiles for a committed
argument's layout).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Format, Layout

from s2d_jax import mesh as mesh_lib
from s2d_jax.sampling import cache as cache_lib, engine

PLATFORMS = ("tpu",)  # XLA:CPU and XLA:GPU take the weights in their default layouts


def auto_decode(graphdef, state_shardings, slot_shardings, *, method, eos_ids: tuple[int, ...], pad_id: int,
                logprobs: bool = False):
    """`engine.decode` as a jitted function of `(state, slots, steps)` that leaves the weights' layouts to XLA:
    lowered with abstract weights (`abstract`) and compiled, its `input_formats[0][0]` are the layouts it chose."""
    body = functools.partial(engine.decode.__wrapped__, graphdef, method=method, eos_ids=eos_ids, pad_id=pad_id,
                             logprobs=logprobs)
    auto = jax.tree.map(lambda s: Format(Layout.AUTO, s), state_shardings)
    return jax.jit(lambda state, slots, steps: body(state, slots, steps), in_shardings=(auto, slot_shardings, None),
                   donate_argnums=1)


def shardings(tree):
    """Each array's sharding (the in_shardings of `auto_decode`)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def abstract(state):
    """`state`'s arrays as shapes, dtypes and shardings (what a program with AUTO layouts is lowered with)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def for_decode(sampler, shape: engine.Shape, method, logprobs: bool):
    """`sampler.state` with each weight whose layout the decode program wants otherwise copied into that layout
    (the rest are the same arrays); where nothing differs, `sampler.state` itself. The layouts are chosen once per
    process for a model structure, its weights' shapes and shardings and the decode's settings: a run builds
    several samplers of one model (the eval stage's systems, the rounds), and each compiled the 8B decode again."""
    slots = engine.empty(shape, cache_lib.layer_sizes(sampler.model.cfg, cache_lib.LIVE_BUCKET))
    state, slots = (mesh_lib.frozen(abstract(x)) for x in (sampler.state, slots))
    formats = _formats(sampler.graphdef, state, slots, method, sampler.eos_ids, sampler.pad_id, logprobs)
    return place(sampler.state, formats)


@functools.lru_cache(maxsize=8)
def _formats(graphdef, state, slots, method, eos_ids: tuple[int, ...], pad_id: int, logprobs: bool):
    """The formats `auto_decode` chooses for the weights (`state`, `slots`: abstract, as `mesh.frozen` keys them)."""
    state, slots = mesh_lib.thawed(state), mesh_lib.thawed(slots)
    program = auto_decode(graphdef, shardings(state), shardings(slots), method=method, eos_ids=eos_ids,
                          pad_id=pad_id, logprobs=logprobs)
    return program.lower(state, slots, jnp.int32(0)).compile().input_formats[0][0]


def place(state, formats):
    """`state` with each array whose layout differs from its format's copied into it (per array: the peak is the
    state plus the copies)."""
    leaves, tree = jax.tree.flatten(state)
    wanted = jax.tree.leaves(formats, is_leaf=lambda x: isinstance(x, Format))
    out = [x if f.layout is None or x.format.layout == f.layout else jax.device_put(x, f)
           for x, f in zip(leaves, wanted)]
    return jax.tree.unflatten(tree, out)


def held_twice(state, formats) -> int:
    """Bytes per device of the weights `place` would copy (abstract `state`: the plan's count): the sampler holds
    them beside the model's own, in place of the decode's per-call copy."""
    default = jax.jit(lambda s: 0, keep_unused=True).lower(state).compile().input_formats[0][0]
    is_format = lambda x: isinstance(x, Format)
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
               for x, have, want in zip(jax.tree.leaves(state), jax.tree.leaves(default, is_leaf=is_format),
                                        jax.tree.leaves(formats, is_leaf=is_format)) if have.layout != want.layout)
