"""Artifacts on disk: JSONL records read with one clear error per bad line, files written atomically (a temporary
name renamed when complete), and append-only files whose torn last line a rerun cuts off."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import socket
import tempfile
import zlib

from s2d_jax.errors import S2DError


def readable_file(path: str, what: str) -> str:
    """`path` if it is a readable, non-empty regular file; else one clear error naming it."""
    if not os.path.exists(path):
        raise S2DError(f"{path}: no such file")
    if os.path.isdir(path):
        raise S2DError(f"{path}: is a directory, expected {what}")
    if not os.access(path, os.R_OK):
        raise S2DError(f"{path}: not readable (permission denied)")
    if os.path.getsize(path) == 0:
        raise S2DError(f"{path}: empty, expected {what}")
    return path


def read_jsonl(path: str, required: tuple[str, ...] = (), strings: tuple[str, ...] = (),
               empty_ok: bool = False) -> list[dict]:
    """Records of a JSONL file (gzipped if it ends in .gz); a malformed line, a record that is not an object, a
    missing field or a field of `strings` that is not a string is one error naming the file and line; so is a file
    without records, unless `empty_ok`."""
    if not (empty_ok and os.path.isfile(path) and os.path.getsize(path) == 0):
        readable_file(path, "a JSONL file")
    rows, number = [], 0
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise S2DError(f"{path}: line {number}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise S2DError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
                missing = [k for k in required if k not in row]
                if missing:
                    raise S2DError(f"{path}: line {number}: missing field {missing[0]!r}")
                wrong = [k for k in strings if not isinstance(row.get(k), str)]
                if wrong:
                    raise S2DError(f"{path}: line {number}: field {wrong[0]!r} must be a string, got "
                                   f"{type(row.get(wrong[0])).__name__}")
                rows.append(row)
    except UnicodeDecodeError:
        raise S2DError(f"{path}: line {number + 1}: not UTF-8 text (a binary file?)") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise S2DError(f"{path}: truncated or not gzip ({e})") from None
    if not rows and not empty_ok:
        raise S2DError(f"{path}: no records")
    return rows


def complete_lines(path: str) -> list[dict]:
    """The complete records of a rollout file being written; a torn last line (a kill mid-write) is cut off."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    keep = data[:data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return [json.loads(line) for line in keep.decode().splitlines() if line.strip()]


@contextlib.contextmanager
def writing(path: str):
    """A failed write (disk full, file too large, no permission) as one error naming `path`."""
    try:
        yield
    except Exception as e:  # OSError, or a writer's own error type around one (safetensors: "I/O error")
        if not isinstance(e, OSError) and not re.search(r"I/O error|os error \d+", str(e)):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        match = re.search(r"I/O error: (.*?) \(os error \d+\)", reason)
        raise S2DError(f"{path}: write failed ({match.group(1) if match else reason}); complete artifacts are kept, "
                       f"and a rerun resumes once the cause is fixed") from None


def write_atomic(path: str, text: str) -> None:
    """Write `path` whole or not at all. The temporary name is per host and process, so hosts that write the same
    artifact to a shared directory never interleave."""
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        with writing(path), open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False):
    """Yield a temporary directory beside `out_dir` to fill; when the block ends without error it becomes
    `out_dir` (replacing an existing one only with `overwrite`), with the user's umask; on error it is removed. So
    a killed writer never leaves a directory that looks complete."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise S2DError(f"{out_dir}: already exists; not overwriting it (pass overwrite=True, or choose another path)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with writing(out_dir):
            yield tmp
        for name in os.listdir(tmp):  # mkdtemp and safetensors create private files; use the user's umask
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old.", dir=parent)
            os.replace(out_dir, os.path.join(old, "x"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
