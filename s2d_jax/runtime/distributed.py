"""Multi-host runs on JAX's own multi-controller runtime: every host runs the same `s2d` command, JAX's coordinator
joins them into one cluster, and the global mesh spans every host's devices. Nothing here is home-made RPC.

Host code sees global arrays through three helpers: `put` (same host value on every process -> a global array),
`fetch` (a global array -> the whole value on every host) and `agree` (a host-side decision every host must share,
such as which rollouts are still missing, OR-ed over hosts).
"""

from __future__ import annotations

import logging
import os
import resource

import jax
import numpy as np

from s2d_jax.errors import S2DError

log = logging.getLogger("s2d")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False, timeout: int = 300,
               heartbeat_timeout: int = 100) -> bool:
    """Join the cluster before anything touches a device. Explicit flags win; `auto` (or a multi-task Slurm step)
    lets `jax.distributed.initialize` detect the cluster itself (Cloud TPU pod slices, Slurm, Open MPI, GKE).
    Returns whether the runtime was initialised (a plain single-process run does nothing)."""
    explicit = [coordinator_address, num_processes, process_id]
    slurm = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1
    if all(v is None for v in explicit) and not (auto or slurm):
        return False
    if any(v is None for v in explicit) and not all(v is None for v in explicit):
        raise S2DError("--coordinator_address, --num_processes and --process_id go together (give all three, or "
                       "none with --distributed to let JAX detect the cluster)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise S2DError(f"--process_id {process_id}: expected 0 <= process_id < --num_processes {num_processes}")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except (RuntimeError, ValueError) as e:
        raise S2DError(f"jax.distributed.initialize failed: {str(e).strip().splitlines()[0]}") from None
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def primary() -> bool:
    """Whether this host writes the single-writer artifacts (metrics, reports, exported models)."""
    return jax.process_index() == 0


def put(value, sharding) -> jax.Array:
    """A global array from a host value that every process holds in full (each keeps only its devices' slices)."""
    value = np.asarray(value)
    if sharding is None:
        return jax.numpy.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def fetch(x) -> np.ndarray:
    """The whole value of a (possibly multi-host) array on every host."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def agree(mask: np.ndarray) -> np.ndarray:
    """The element-wise OR of a boolean host array over all hosts (identical on every host afterwards)."""
    mask = np.asarray(mask, bool)
    if jax.process_count() == 1:
        return mask
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(mask.astype(np.int32))).reshape(-1, *mask.shape).any(0)


def barrier(name: str) -> None:
    """Wait until every host reaches `name` (no-op on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def device_bytes() -> int:
    """What one device holds: its allocator's limit on an accelerator; on CPU the host's memory (or this process's
    address-space limit) shared by the local devices."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        host = min(host, limit)
    return host // jax.local_device_count()
