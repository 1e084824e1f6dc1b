"""Device meshes and the logical-axis rules: the only module that knows mesh axis names.

Model, cache and trainer code name *logical* axes (`batch`, `embed`, `kv_heads`, ...). One table maps them to the
mesh axes `data`, `fsdp` and `tensor`. A dimension that a mesh axis does not divide stays replicated on that axis,
so a model with 3 kv heads still runs on `tensor=2` (its attention is then replicated, not split).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from s2d_jax.runtime import distributed
from s2d_jax.errors import S2DError

log = logging.getLogger("s2d")
MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is split over, in order. Axes not listed are replicated.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
}

Axes = Sequence[str | None]


def mesh_sizes(data: int, fsdp: int, tensor: int, count: int) -> dict[str, int]:
    """The axis sizes of a (data, fsdp, tensor) mesh over `count` devices; -1 takes all remaining devices."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    if list(sizes.values()).count(-1) > 1:
        raise S2DError(f"mesh {sizes}: at most one axis may be -1")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise S2DError(f"mesh {sizes}: axis sizes must be positive or -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    sizes = {k: (count // known if v == -1 else v) for k, v in sizes.items()}
    if math.prod(sizes.values()) != count:
        raise S2DError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, but {count} are available")
    return sizes


def generation_sizes(gen: dict, train: dict, cfgs, count: int, per_host: int, platform: str,
                     device_bytes: float) -> dict[str, int]:
    """The generation mesh's axis sizes over `count` devices (`generate.mesh`; a decode step reads every weight,
    so it wants them in place, never gathered). Set: checked against the devices and every sampling model's query
    and kv heads (`cfgs`). Auto (all three 0): on CPU the training mesh `train` (fake devices share one host's
    memory: no interconnect to spare); elsewhere tensor parallelism over the most chips of one host that divide
    every model's heads and kv heads, data replicas over the rest, and FSDP only when a replica's weights (compute
    dtype) would fill more than half of a device's `device_bytes`."""
    heads = sorted({h for c in cfgs for h in (c.num_heads, c.num_kv_heads)})
    fits = lambda t: all(h % t == 0 for h in heads)
    if any(gen.values()):
        if 0 in gen.values():
            raise S2DError(f"config key 'generate.mesh': {gen}: set all three axes (-1 or >= 1), or leave all "
                           f"three 0 (chosen for decoding)")
        try:
            sizes = mesh_sizes(gen["data"], gen["fsdp"], gen["tensor"], count)
        except S2DError as e:
            raise S2DError(f"config key 'generate.mesh': {e}") from None
        if not fits(sizes["tensor"]):
            works = [t for t in range(1, count + 1) if count % t == 0 and fits(t)]
            raise S2DError(f"config key 'generate.mesh.tensor': {sizes['tensor']} does not divide the sampling "
                           f"model's heads and kv heads ({', '.join(map(str, heads))}); would work: "
                           f"{', '.join(map(str, works))}")
        return sizes
    if platform == "cpu":
        return mesh_sizes(train["data"], train["fsdp"], train["tensor"], count)
    tensor = max(t for t in range(1, per_host + 1) if per_host % t == 0 and count % t == 0 and fits(t))
    weights = max(c.num_params * np.dtype(c.dtype).itemsize for c in cfgs)
    fsdp = 1
    while weights / (tensor * fsdp) > device_bytes / 2 and count % (tensor * fsdp * 2) == 0:
        fsdp *= 2
    return {"data": count // (tensor * fsdp), "fsdp": fsdp, "tensor": tensor}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all). -1 takes all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(data, fsdp, tensor, len(devices))
    grid = np.asarray(devices).reshape(tuple(sizes.values()))
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def partition_spec(axes: Axes, shape: Sequence[int], mesh) -> P:
    """The PartitionSpec that RULES give `axes` on `mesh`, keeping only mesh axes that divide the dimension."""
    spec, used = [], set()
    for name, dim in zip(axes, shape):
        chosen = []
        for mesh_axis in RULES.get(name, ()) if name else ():
            size = mesh.shape[mesh_axis]
            if mesh_axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in chosen) * size):
                continue
            chosen.append(mesh_axis)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def named_sharding(axes: Axes, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes, shape, mesh))


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Inside jit under `jax.set_mesh`: pin `x` to the rules' layout. Without a mesh it is a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, partition_spec(axes, x.shape, mesh))


def param_axes(variable: nnx.Variable) -> Axes:
    """The logical axes a parameter was created with (`nnx.Param(..., axes=(...))`)."""
    axes = variable.get_metadata().get("axes")
    return axes if axes is not None else (None,) * len(variable.shape)


def state_shardings(state: nnx.State, mesh: Mesh):
    """A pytree of NamedShardings matching `state`, from each parameter's logical axes."""
    return jax.tree.map(
        lambda v: v.replace(named_sharding(param_axes(v), v.shape, mesh)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def frozen(tree) -> tuple:
    """A pytree of shardings (or of abstract arrays with them) as a hashable key: (its leaves, its structure). The
    programs built once per process (the train step, the decode's layouts) are cached by the layouts they take."""
    leaves, treedef = jax.tree.flatten(tree)
    return tuple(leaves), treedef


def thawed(key: tuple):
    """The pytree `frozen` made `key` of."""
    leaves, treedef = key
    return treedef.unflatten(leaves)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every parameter of `model` (in place) on `mesh` by the rules."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    state = jax.tree.map(lambda x, s: distributed.put(x, s), state, shardings)  # multi-host safe
    nnx.update(model, state)
    return model


def mesh_devices(config: ConfigDict) -> list:
    """The devices the configured mesh uses: all of them, or the first data x fsdp x tensor when that is fewer."""
    m = config.mesh
    devices = jax.devices()
    if -1 not in (m.data, m.fsdp, m.tensor) and 0 < (wanted := m.data * m.fsdp * m.tensor) < len(devices):
        log.info("mesh %s uses %d of the %d devices", dict(data=m.data, fsdp=m.fsdp, tensor=m.tensor), wanted,
                 len(devices))
        devices = devices[:wanted]
    return devices


def generation_devices(config: ConfigDict) -> list:
    """The devices the generation mesh uses: all of them, the first data x fsdp x tensor of a smaller
    `generate.mesh`, or (unset, on CPU) the training mesh's."""
    g = config.generate.mesh
    if not any((g.data, g.fsdp, g.tensor)) and jax.default_backend() == "cpu":
        return mesh_devices(config)
    devices = jax.devices()
    if -1 not in (g.data, g.fsdp, g.tensor) and 0 < g.data * g.fsdp * g.tensor < len(devices):
        devices = devices[:g.data * g.fsdp * g.tensor]
    return devices
