"""A lost host, reported in one line. On several hosts `s2d` runs the work in a child process and supervises it.

When a host dies, JAX's coordination service notices its missing heartbeats (after `cluster.heartbeat_timeout_s`)
and every survivor's runtime aborts its own process from a native thread, printing a native stack dump: nothing in
Python can catch that. So the parent `s2d` keeps the child's native log lines and dump out of the terminal (they go
to WORKDIR/s2d-error.log), reads from them which host was lost, and prints the last line itself. Signals sent to
the parent are passed on to the child (which stops cleanly: `stopping.py`); the child dies with its parent.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

ENV = "S2D_SUPERVISED"
HOST_LOST = 75  # EX_TEMPFAIL: a rerun on all hosts resumes
# Native (C++) log lines: glog/absl lines (E1203 07:13:30.98 ...), their continuation, and the fatal dump
NATIVE = re.compile(r"^([EFW]\d{4} \d\d:\d\d:\d\d|\*\*\* |\s+@\s+0x|=== Source Location Trace|external/|RPC: /|"
                    r"\[type\.googleapis|The tasks have crashed|\d+$|Barrier result:)")
LOST = (re.compile(r"Task (\d+) heartbeat timeout"), re.compile(r"unhealthy \(stopped sending heartbeats\):\s*\n(\d+)"))


def wanted(argv: list[str]) -> bool:
    """Whether this `s2d` joins a cluster (and is not already the supervised child)."""
    cluster = any(a.split("=")[0] in ("--coordinator_address", "--num_processes", "--distributed") for a in argv)
    slurm = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1
    return (cluster or slurm) and not os.environ.get(ENV)


def run(argv: list[str], log_path: str) -> int:
    """Run `s2d ARGV` as a supervised child (its native log to `log_path`); return the exit status to leave with."""
    # its own session: a Ctrl-C or a scheduler's signal to our process group reaches it once, passed on by us
    child = subprocess.Popen([sys.executable, "-m", "s2d_jax.cli", *argv], env={**os.environ, ENV: str(os.getpid())},
                             stderr=subprocess.PIPE, start_new_session=True)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: child.send_signal(signum))
    native, in_dump, pending = [], False, ""
    while chunk := child.stderr.read1(1 << 16):  # as it comes: progress bars redraw without newlines
        *lines, pending = (pending + chunk.decode(errors="replace")).split("\n")
        for line in (f"{line}\n" for line in lines):
            in_dump = in_dump or line.startswith(("F", "*** Check failure")) and bool(NATIVE.match(line))
            if in_dump or NATIVE.match(line) or (line == "\n" and native and native[-1] != "\n"):
                native.append(line)  # (a blank line closes a native entry)
            else:
                sys.stderr.write(line)
        if "\r" in pending and not NATIVE.match(pending):  # a progress bar's redraw: show it now
            head, _, pending = pending.rpartition("\r")
            sys.stderr.write(head + "\r")
        sys.stderr.flush()
    sys.stderr.write(pending)
    code = child.wait()
    if native:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        with open(log_path, "a") as f:
            f.writelines(native)
    if code >= 0 and code != HOST_LOST:
        return code
    text = "".join(native)
    lost = sorted({int(m) for pattern in LOST for m in pattern.findall(text)})
    if lost or code == HOST_LOST:
        who = (f"host {', '.join(map(str, lost))} of the cluster was lost (no heartbeat)" if lost else
               "the cluster lost a host (a collective failed)")
        print(f"s2d: error: {who}; this host stopped; complete artifacts are kept: rerun the same command on all "
              f"hosts to resume (details in {log_path})", file=sys.stderr)
        return HOST_LOST
    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
    print(f"s2d: error: the s2d process ended by {name}; complete artifacts are kept, and a rerun resumes "
          f"(details in {log_path})", file=sys.stderr)
    return 128 - code


def collective_failed(e: BaseException) -> bool:
    """Whether `e`, in a multi-host run, is a collective or the coordination service failing (a peer is gone)."""
    import jax

    markers = ("Gloo", "gloo", "UNAVAILABLE", "DEADLINE_EXCEEDED", "heartbeat", "coordination service",
               "Connection reset", "Connection closed")
    return jax.process_count() > 1 and os.environ.get(ENV) and any(m in str(e) for m in markers)


def await_abort(log_path: str, config) -> None:
    """In the child: a collective failed because a host is gone. The coordination service will end this process
    within its heartbeat timeout, naming the lost host to the supervisor; wait for it, then leave anyway."""
    import time

    timeout = config.cluster.heartbeat_timeout_s if config is not None else 100
    time.sleep(timeout + 10)
    sys.stderr.flush()
    os._exit(HOST_LOST)


def die_with_parent() -> None:
    """In the supervised child, first thing: be killed when the supervisor dies (Linux prctl PR_SET_PDEATHSIG),
    or leave at once if it already has."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.environ.get(ENV, "").isdigit() and os.getppid() != int(os.environ[ENV]):
        os._exit(1)
