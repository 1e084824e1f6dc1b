"""Compile once: JAX's persistent compilation cache, on by default for every `s2d` stage.

Each stage runs in its own process and compiled every program from scratch (on a TPU at 8B, minutes per shape).
With the cache a program XLA compiled once, in any process, loads from disk next time. Where: `compile.cache_dir`
("" = $S2D_XLA_CACHE, else JAX's own $JAX_COMPILATION_CACHE_DIR, else ~/.cache/s2d_jax/xla; "off" = no cache),
e.g. a bucket path shared by a pod's hosts.
The cache has a size bound, so JAX evicts least-recently-used entries and takes a file lock around every read
and write: two processes on one machine may share it. Keys hold the program, the compiler options, the devices and
JAX's and the backend's versions, so a stale entry is never loaded.
"""

from __future__ import annotations

import logging
import os

ENV = "S2D_XLA_CACHE"
DEFAULT = os.path.join("~", ".cache", "s2d_jax", "xla")
MAX_BYTES = 8 << 30  # a bound (it turns on JAX's eviction and its file lock)
MIN_COMPILE_S = 0.1  # programs that compile faster are not worth a disk entry

log = logging.getLogger("s2d")


def directory(setting: str) -> str:
    """The cache directory a `compile.cache_dir` value names ("" for none)."""
    if setting == "off":
        return ""
    path = setting or os.environ.get(ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def enable(setting: str) -> str:
    """Turn JAX's persistent cache on at `directory(setting)` (or off); returns the directory ("" = off)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = directory(setting)
    if path and "://" not in path:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            log.warning("compile cache %s: %s; compiling without it", path, e)
            path = ""
    jax.config.update("jax_compilation_cache_dir", path or None)
    jax.config.update("jax_enable_compilation_cache", bool(path))
    if path:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    compilation_cache.reset_cache()  # JAX decides whether to use its cache once per process: decide again
    return path
