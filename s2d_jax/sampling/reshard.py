"""Weights between the training layout and the generation layout, on device.

Training wants FSDP (parameters and optimizer state sharded over the rows' devices); decoding reads every weight
every step and wants them in place, tensor-parallel (`generate.mesh`). A model moves from one layout to the other
with `jax.device_put` to the target shardings (as Tunix's `reshard` does): never through the host or a checkpoint.
Parameters move a layer at a time, each layer's copies finished before the next starts, so the peak is one
layout plus one layer; with `donate`, each layer's source arrays are freed as its copy lands.
"""

from __future__ import annotations

import jax
from flax import nnx

from s2d_jax import mesh as mesh_lib


def reshard(model: nnx.Module, mesh, donate: bool = False) -> nnx.Module:
    """A model equal to `model`, its parameters laid out on `mesh` by the logical-axis rules (one device when `mesh`
    is None); bitwise the same values. LoRA adapters move with their base, applied as they were (the generation
    layout holds them beside the frozen weights). `donate`: free `model`'s arrays as they are copied (then `model`
    must not be used again)."""
    graphdef, state = nnx.split(model)
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, state)
    else:
        shardings = mesh_lib.state_shardings(state, mesh)
    flat, tree = jax.tree.flatten(state)
    targets = jax.tree.leaves(shardings)
    groups: dict[str, list[int]] = {}
    for i, path in enumerate(_paths(state)):
        groups.setdefault(_layer(path), []).append(i)
    out = list(flat)
    for indices in groups.values():  # one layer's parameters in flight at a time
        moved = jax.device_put([flat[i] for i in indices], [targets[i] for i in indices])
        jax.block_until_ready(moved)
        for i, x in zip(indices, moved):
            if donate and not _shares(flat[i], x):  # (a shard already in place is the same buffer: kept)
                flat[i].delete()
            out[i] = x
    return nnx.merge(graphdef, jax.tree.unflatten(tree, out))


def _shares(a: jax.Array, b: jax.Array) -> bool:
    """Whether `b` holds any of `a`'s buffers (a shard `device_put` left where it was)."""
    mine = {shard.data.unsafe_buffer_pointer() for shard in a.addressable_shards}
    return any(shard.data.unsafe_buffer_pointer() in mine for shard in b.addressable_shards)


def _paths(state) -> list[tuple]:
    return [path for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


def _layer(path: tuple) -> str:
    """The group a parameter moves with: its layer (`layers/N/...`), or everything outside the layers together."""
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    return f"layers/{keys[1]}" if len(keys) > 1 and keys[0] == "layers" else "rest"
