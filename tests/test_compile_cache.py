"""Compile once: `s2d` keeps XLA's programs in a persistent cache that fresh processes load, two at a time too."""

import json
import os
import subprocess
import sys

from s2d_jax.runtime import compile_cache

from conftest import memory_maps, release_programs

SCRIPT = """
import json, sys
import s2d_jax
from s2d_jax.runtime import compile_cache
from s2d_jax.model import PRESETS, init_model
from s2d_jax.sampling import Sampler, clock
from s2d_jax.tokenizer import byte_tokenizer
compile_cache.enable(sys.argv[1])
cfg = PRESETS["tiny"].replace(eos_token_ids=(7,))
sampler = Sampler(init_model(cfg, seed=0), byte_tokenizer(), max_batch=4)
out = sampler.generate(["a prompt", "another one"], n=2, temperature=1.0, max_new_tokens=20, progress=False)
print(json.dumps({**clock.totals(), "tokens": [[s.token_ids for s in row] for row in out]}))
"""


def _start(path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(path)], stdout=subprocess.PIPE, text=True, env=env)


def _result(proc) -> dict:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def test_two_processes_fill_the_cache_together_and_a_third_loads_it(tmp_path):
    first = [_result(p) for p in [_start(tmp_path / "xla"), _start(tmp_path / "xla")]]  # at once, one directory
    third = _result(_start(tmp_path / "xla"))
    assert first[0]["tokens"] == first[1]["tokens"] == third["tokens"]
    assert third["cache_hits"] >= 3  # prefill, insert, decode at least
    assert third["compiles"] < min(f["compiles"] for f in first)
    assert any(name.endswith("-cache") for name in os.listdir(tmp_path / "xla"))


ONE_PROGRAM = """
import sys
import jax, jax.numpy as jnp
from jax import monitoring
from s2d_jax.runtime import compile_cache
compile_cache.enable(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # (this small program is cached too)
hits = []
monitoring.register_event_listener(lambda event, **_: hits.append(event) if event.endswith("/cache_hits") else 0)
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).sum()), len(hits))
"""


def _one_program(path) -> tuple[str, int, str]:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    done = subprocess.run([sys.executable, "-c", ONE_PROGRAM, str(path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    value, hits = done.stdout.split()
    return value, int(hits), done.stderr


def test_an_entry_cut_short_is_written_again_by_the_next_process(tmp_path):
    """JAX writes cache entries in place and skips a key whose file exists: an entry cut short (a kill mid-write, a
    full disk) was warned about and compiled again in every later process. The next process removes it and
    writes it whole; the one after loads it."""
    cache = tmp_path / "xla"
    value, hits, _ = _one_program(cache)
    entries = [p for p in cache.iterdir() if p.name.endswith("-cache")]  # the product, and jnp.ones' small programs
    (entry,) = [p for p in entries if p.name.startswith("jit__lambda-")]
    assert hits == 0
    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 2])
    again, hits, err = _one_program(cache)
    assert again == value and hits == len(entries) - 1
    assert "Error reading persistent compilation cache entry for 'jit__lambda'" in err
    assert "removed 1 unreadable entry of jit__lambda" in err
    assert entry.stat().st_size == len(whole)
    third, hits, err = _one_program(cache)
    assert third == value and hits == len(entries) and "Error reading" not in err


def test_the_cache_directory_setting(monkeypatch):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert compile_cache.directory("off") == ""
    assert compile_cache.directory("") == os.path.expanduser(os.path.join("~", ".cache", "s2d_jax", "xla"))
    monkeypatch.setenv(compile_cache.ENV, "/somewhere/xla")
    assert compile_cache.directory("") == "/somewhere/xla"
    assert compile_cache.directory("gs://bucket/xla") == "gs://bucket/xla"


def test_a_finished_samplers_programs_are_released():
    """XLA:CPU maps each program's machine code into the process (some 15 memory maps a program), and the kernel caps
    a process's maps (vm.max_map_count, 65,530 by default): past it LLVM's JIT cannot map memory and the next compile
    dies in a segmentation fault (this suite's long-lived workers passed 49,000 maps until tests/conftest.py dropped
    programs between modules). Nothing in s2d may pin a finished sampler's programs: once JAX's caches are cleared,
    their maps are gone."""
    from s2d_jax.model import PRESETS, init_model
    from s2d_jax.sampling import Sampler
    from s2d_jax.tokenizer import byte_tokenizer

    def sample():
        sampler = Sampler(init_model(PRESETS["tiny"].replace(eos_token_ids=(7,)), seed=0), byte_tokenizer(),
                          max_batch=4)
        sampler.generate(["a prompt", "another one"], n=2, temperature=1.0, max_new_tokens=20, progress=False)
        return memory_maps()[0]

    sample()  # the first sampling also starts the runtime's threads, which stay
    before = release_programs()
    compiled = sample() - before
    after = release_programs()
    assert compiled > 100 and after - before < compiled // 10, (before, compiled, after)
