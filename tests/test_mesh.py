"""Sharding by logical axes: 8 fake devices as a (data=2, fsdp=2, tensor=2) mesh."""

import jax
import numpy as np
import pytest
from flax import nnx

import s2d_jax
from s2d_jax import mesh as mesh_lib
from s2d_jax.model import PRESETS, init_model
from conftest import assert_sharded_forward_equals_one_device


def test_make_mesh_shapes_and_errors():
    assert dict(s2d_jax.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(s2d_jax.make_mesh(data=-1, tensor=2).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(s2d_jax.S2DError, match="needs 12 devices, but 8 are available"):
        s2d_jax.make_mesh(data=3, fsdp=2, tensor=2)
    with pytest.raises(s2d_jax.S2DError, match="at most one axis may be -1"):
        s2d_jax.make_mesh(data=-1, fsdp=-1)


def test_rules_fall_back_to_replication_when_an_axis_does_not_divide():
    mesh = s2d_jax.make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh_lib.partition_spec(("embed", "kv_heads", None), (64, 2, 8), mesh) == jax.P("fsdp", "tensor", None)
    assert mesh_lib.partition_spec(("embed", "kv_heads", None), (64, 3, 8), mesh) == jax.P("fsdp", None, None)
    assert mesh_lib.partition_spec(("batch", None), (8, 5), mesh) == jax.P(("data", "fsdp"), None)
    assert mesh_lib.partition_spec(("batch", None), (2, 5), mesh) == jax.P("data", None)


def test_sharded_forward_equals_single_device():
    cfg = PRESETS["tiny"].replace(num_kv_heads=2, num_heads=4)
    single = init_model(cfg, seed=0)
    mesh = s2d_jax.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = init_model(cfg, seed=0, mesh=mesh)
    for key, var in nnx.to_flat_state(nnx.state(sharded)):  # shard shapes are what the rules imply
        array = var[...]
        spec = mesh_lib.partition_spec(mesh_lib.param_axes(var), array.shape, mesh)
        expect = tuple(d // int(np.prod([mesh.shape[a] for a in (s if isinstance(s, tuple) else (s,))]))
                       if s else d for d, s in zip(array.shape, tuple(spec) + (None,) * (array.ndim - len(spec))))
        assert array.addressable_shards[0].data.shape == expect, key
    assert sharded.layers[0].mlp.gate_up[...].addressable_shards[0].data.shape == (2, 32, 64)
    assert_sharded_forward_equals_one_device(single, sharded, mesh, vocab=256)
