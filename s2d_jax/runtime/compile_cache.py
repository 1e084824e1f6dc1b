"""Compile once: JAX's persistent compilation cache, on by default for every `s2d` stage.

Each stage runs in its own process and compiled every program from scratch (on a TPU at 8B, minutes per shape).
With the cache a program XLA compiled once, in any process, loads from disk next time. Where: `compile.cache_dir`
("" = $S2D_XLA_CACHE, else JAX's own $JAX_COMPILATION_CACHE_DIR, else ~/.cache/s2d_jax/xla; "off" = no cache),
e.g. a bucket path shared by a pod's hosts.
The cache has a size bound, so JAX evicts least-recently-used entries and takes a file lock around every read
and write: two processes on one machine may share it. Keys hold the program, the compiler options, the devices and
JAX's and the backend's versions, so a stale entry is never loaded.

JAX writes an entry in place and never writes a key whose file exists, so an entry cut short (a kill mid-write, a
full disk) was read, warned about and compiled again in every later process. `enable` hooks that warning: the
entries of the program it names that do not decompress are removed, and this process's compile writes the entry
afresh.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import warnings
import zlib

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
    if path and "://" not in path:
        _repair_on_warning(path)
    return path


# JAX's warning on an entry it could not read (jax/_src/compiler.py `_cache_read`), and its entries' file names
UNREADABLE = re.compile(r"Error reading persistent compilation cache entry for '([^']+)'")
ENTRY = "{module}-*-cache"  # KEY-cache (beside it KEY-atime); a key starts with the program's module name


def _repair_on_warning(path: str) -> None:
    """Route JAX's unreadable-entry warning through `repair` (once per process; the warning still shows)."""
    shown = warnings.showwarning
    if getattr(shown, "_s2d_cache", None) == path:
        return
    base = getattr(shown, "_s2d_base", shown)

    def showwarning(message, category, filename, lineno, file=None, line=None):
        found = UNREADABLE.search(str(message))
        if found:
            removed = repair(path, found.group(1))
            if removed:
                log.warning("compile cache %s: removed %d unreadable entr%s of %s (cut short when written); this "
                            "process writes it again", path, removed, "y" if removed == 1 else "ies", found.group(1))
        base(message, category, filename, lineno, file, line)

    showwarning._s2d_cache, showwarning._s2d_base = path, base
    warnings.showwarning = showwarning


def repair(path: str, module: str) -> int:
    """Remove `module`'s entries under `path` that no decompressor JAX may have used can read; returns how many."""
    removed = 0
    for entry in glob.glob(os.path.join(glob.escape(path), ENTRY.format(module=glob.escape(module)))):
        try:
            with open(entry, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if not _readable(data):
            for name in (entry, entry[: -len("-cache")] + "-atime"):
                with contextlib.suppress(OSError):
                    os.remove(name)
            removed += 1
    return removed


def _readable(data: bytes) -> bool:
    """Whether `data` decompresses whole with zstd (JAX's choice where installed) or zlib (its fallback)."""
    decoders = [zlib.decompress]
    try:
        from compression import zstd  # Python 3.14+

        decoders.append(zstd.decompress)
    except ImportError:
        pass
    try:
        import zstandard

        decoders.append(lambda b: zstandard.ZstdDecompressor().decompress(b))
    except ImportError:
        pass
    for decode in decoders:
        try:
            decode(data)
            return True
        except Exception:  # noqa: BLE001 (each library's own error types)
            continue
    return False
