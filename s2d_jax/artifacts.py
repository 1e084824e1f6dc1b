"""Artifacts on disk: JSONL records read with one clear error per bad line, files written atomically (a temporary
name renamed when complete), and append-only files whose torn last line a rerun cuts off."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import socket
import tempfile

from s2d_jax.errors import S2DError


def read_jsonl(path: str, required: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSONL file (gzipped if it ends in .gz); a malformed line or a missing field is one error naming
    the file and line."""
    if not os.path.exists(path):
        raise S2DError(f"{path}: no such file")
    rows = []
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise S2DError(f"{path}: line {number}: not valid JSON ({e.msg})") from None
            missing = [k for k in required if k not in row]
            if missing:
                raise S2DError(f"{path}: line {number}: missing field {missing[0]!r}")
            rows.append(row)
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


def write_atomic(path: str, text: str) -> None:
    """Write `path` whole or not at all. The temporary name is per host and process, so hosts that write the same
    artifact to a shared directory never interleave."""
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
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
