"""Compiled for an accelerator this machine does not have: `s2d plan` with `plan.topology` (e.g. `v5e-8`).

With libtpu (from the package index) XLA compiles for a Cloud TPU topology without a TPU
(`jax.experimental.topologies.get_topology_desc`), as MaxText's `train_compile.py` does. Each device program of the
configured run is built as the stages build it, on abstract arrays (no weights read, nothing allocated), over the
target's chips laid out as the configured mesh: the train step (`trainer.step_program`: micro-batch, accumulation,
LoRA or full, remat, loss chunk, the attention `auto` picks on the target) and the sampler's prefill, insert and
decode chunk at their largest shapes. XLA's memory analysis gives each program's peak per chip; its cost analysis
(FLOPs, bytes) and the chip's peaks give a roofline time: an estimate, never a measurement. XLA counts a loop's
body once, so costs are the whole program's where its layers are unrolled (the decode) and else taken from unscanned
copies of 1 and 2 layer periods and extrapolated to the depth. XLA's
bytes also count every read and write of on-chip VMEM; a second roofline takes only the bytes with an end in HBM,
read from the whole program's HLO (`plan/hbm.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import re
import time

import jax
from ml_collections import ConfigDict

from s2d_jax import mesh as mesh_lib
from s2d_jax.plan import aot_programs, hbm
from s2d_jax.sampling import engine
from s2d_jax.errors import REMEDIES, S2DError

GB = 1 << 30
PROGRAMS = ("train_step", "prefill", "insert", "decode")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator type as Google spells it, and what a roofline needs of one chip."""

    name: str
    topology: str  # get_topology_desc's name
    host_bounds: tuple[int, int, int]  # chips per host along each axis
    chips: int
    chip_config: str  # "megacore": v4 / v5p, one device per chip of two cores
    hbm_gb: float  # HBM per chip (GiB)
    bf16_flops: float  # peak dense bf16 FLOP/s per chip
    hbm_bytes_s: float  # HBM bandwidth per chip (bytes/s)
    platform: str = "tpu"
    spec: str = ""  # a GPU's target description (XLA's GpuTargetConfigProto, text)

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.host_bounds)

    @property
    def costed(self) -> bool:
        """Whether its compiler gives a cost analysis (XLA:GPU compiled without a GPU has none)."""
        return self.platform != "cuda"


# Per chip, from Google's Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e):
# HBM, peak bf16 and HBM bandwidth. Topology names and host bounds as MaxText's accelerator_to_spec_map.py (v5e-8
# and v6e-8 as the single 8-chip host Google sells as v5litepod-8 / v6e-8). Slices up to 64 chips (no wraparound).
_CHIPS = {"v4": ("megacore", 32, 275e12, 1228e9), "v5e": ("default", 16, 197e12, 819e9),
          "v5p": ("megacore", 95, 459e12, 2765e9), "v6e": ("default", 32, 918e12, 1640e9)}
_SLICES = [("v4-8", "v4:2x2x1", 4), ("v4-16", "v4:2x2x2", 8), ("v4-32", "v4:2x2x4", 16), ("v4-64", "v4:2x4x4", 32),
           ("v5e-1", "v5e:1x1", 1), ("v5e-4", "v5e:2x2", 4), ("v5e-8", "v5e:2x4", 8), ("v5e-16", "v5e:4x4", 16),
           ("v5e-32", "v5e:4x8", 32), ("v5e-64", "v5e:8x8", 64), ("v5p-8", "v5:2x2x1", 4), ("v5p-16", "v5:2x2x2", 8),
           ("v5p-32", "v5:2x2x4", 16), ("v5p-64", "v5:2x4x4", 32), ("v6e-1", "v6e:1x1", 1), ("v6e-4", "v6e:2x2", 4),
           ("v6e-8", "v6e:2x4", 8), ("v6e-16", "v6e:4x4", 16), ("v6e-32", "v6e:4x8", 32), ("v6e-64", "v6e:8x8", 64)]
TARGETS = {name: Target(name, topo, (1, 1, 1) if chips == 1 else (2, 4, 1) if chips == 8 and name[:3] in ("v5e", "v6e")
                        else (2, 2, 1), chips, *_CHIPS[name.split("-")[0]])
           for name, topo, chips in _SLICES}
ALIASES = {f"v5litepod-{n.split('-')[1]}": n for n in TARGETS if n.startswith("v5e")}


def _gpu_spec(name: str, memory: int, bandwidth: float) -> str:
    """XLA's target description of a Hopper GPU: the values of XLA's own h100_sxm.txtpb (xla/tools/hlo_opt/
    gpu_specs, Apache-2.0), with this card's memory and bandwidth, and the cuDNN version to compile for."""
    return ("gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152 "
            "shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128 "
            "block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 "
            f"memory_bandwidth: {int(bandwidth)} l2_cache_size: 52428800 clock_rate_ghz: 1.98 "
            f"device_memory_size: {memory} shared_memory_per_block_optin: 232448 "
            "cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536 } "
            f'platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 8 }} device_description_str: "{name}"')


# One GPU each (a mesh over one card), with the CUDA plugin (`jax[cuda13]`; on a machine without a GPU,
# `jax-cuda13-plugin` alone): NVIDIA's H100 SXM and H200 data sheets (dense bf16 989 TFLOP/s; 3.35 / 4.8 TB/s).
for _name, _desc, _gb, _bw in (("h100-80gb", "NVIDIA H100 80GB HBM3", 80, 3.35e12),
                               ("h200", "NVIDIA H200", 141, 4.8e12)):
    TARGETS[_name] = Target(_name, "1x1x1", (1, 1, 1), 1, "", _gb, 989e12, _bw, platform="cuda",
                            spec=_gpu_spec(_desc, _gb * 10**9, _bw))


def target(name: str) -> Target:
    found = TARGETS.get(ALIASES.get(name, name))
    if found is None:
        raise S2DError(f"config key 'plan.topology': {name!r} is not a known accelerator type (known: "
                       f"{', '.join(TARGETS)}; v5litepod-N = v5e-N)")
    return found


def devices(t: Target) -> list:
    """The target's devices, for compiling only. libtpu is told it is not on a TPU VM, so it probes nothing."""
    if t.platform == "tpu" and importlib.util.find_spec("libtpu") is None:
        raise S2DError(f"config key 'plan.topology': compiling for {t.name} needs libtpu (pip install "
                       f"'s2d-jax[tpu]', or libtpu alone)")
    if t.platform == "cuda":
        if not any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)):
            raise S2DError(f"config key 'plan.topology': compiling for {t.name} needs JAX's CUDA plugin (pip "
                           f"install 's2d-jax[cuda]'; without a GPU, jax-cuda13-plugin alone)")
        from jax.experimental import topologies

        try:
            return topologies.get_topology_desc("", platform="cuda", topology=t.topology, target_config=t.spec).devices
        except Exception as e:
            raise S2DError(f"config key 'plan.topology': {t.name}: the CUDA compiler would not load the target: "
                           f"{_first_line(e)}") from None
    if jax.default_backend() != "tpu":  # keep libtpu from asking a metadata server for a TPU that is not here
        for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_ID", "0"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                           ("TPU_ACCELERATOR_TYPE", t.name.replace("v5e", "v5litepod")),
                           ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):  # compiling only: several plans at once
            os.environ.setdefault(key, value)
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform=t.platform, topology_name=t.topology,
                                            chip_config_name=t.chip_config, chips_per_host_bounds=t.host_bounds,
                                            num_slices=1).devices
    except Exception as e:  # libtpu's own message, whatever its type
        raise S2DError(f"config key 'plan.topology': {t.name}: the compiler would not load the topology: "
                       f"{_first_line(e)}") from None


def target_plan(config: ConfigDict, t: Target) -> dict:
    """`s2d plan`'s estimate over `t`'s chips, with the generation mesh the stages would choose there."""
    from s2d_jax.plan import estimate as plan_lib
    from s2d_jax.model.attention import unavailable

    if why := unavailable(config.model.attention, t.platform):
        raise S2DError(f"config key 'model.attention': {why} (plan.topology={t.name})")
    gen = plan_lib.generation_shape(config, t.chips, math.prod(t.host_bounds), t.platform, t.hbm_gb * GB)
    return plan_lib.plan(config, plan_lib.mesh_shape(config.mesh, t.chips), gen)


def programs(config: ConfigDict, t: Target, p: dict) -> Programs:
    """The run's programs on `t`'s chips: the train step on the plan's training mesh, the sampler's on its
    generation mesh (`p`: `target_plan`)."""
    chips = devices(t)
    return Programs(config, mesh_lib.make_mesh(**p["mesh"], devices=chips), t,
                    mesh_lib.make_mesh(**p["generate_mesh"], devices=chips))


def compile_all(config: ConfigDict, t: Target, p: dict, cfg, sampler, prefill_buckets: tuple[int, ...] = ()) -> dict:
    """Per program: the mesh it runs on, XLA's bytes per chip (arguments, temporaries, outputs, aliases, peak),
    compile seconds, the collectives in its HLO by kind, FLOPs and bytes per call (extrapolated to the depth) and a
    roofline time (a train step: all its micro-steps; a decode call: one step of every slot); and `prefill@N`, the
    costs of a full insert's prefill at prompt bucket N. `cfg`: the trained model's config; `sampler`: the sampling
    model's (the teacher, if any)."""
    run = programs(config, t, p)
    cfg, sampler = cfg.replace(platform=t.platform), sampler.replace(platform=t.platform)
    with uncached():
        out = {name: run.figures(name, cfg if name == "train_step" else sampler) for name in PROGRAMS}
        with jax.set_mesh(run.gen):
            out["decode"]["held_twice"] = aot_programs.held_twice(run, sampler)
        out.update({f"prefill@{n}": run.figures(f"prefill@{n}", sampler, memory=False) for n in prefill_buckets})
        return out


@contextlib.contextmanager
def uncached():
    """Compiles for a target outside the persistent XLA cache: no machine here could load those executables."""
    from jax.experimental.compilation_cache import compilation_cache

    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # (JAX decides whether to use its cache once, and keeps the answer)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
        compilation_cache.reset_cache()


def plan_figures(config: ConfigDict, t: Target, p: dict) -> dict:
    """What `s2d plan` adds for a target: the target, every program's compiled figures, the compiled peak of
    training and of generation per chip (generation: the largest of the prefill with the slots held, the insert
    with the weights held, and the decode chunk), and roofline times."""
    from s2d_jax.plan import estimate as plan_lib

    cfg = plan_lib.model_config(config)  # (reads the model's config.json: once per model)
    sampler = plan_lib.model_config(config, system2=True)
    g = p["generate_mesh"]
    s = plan_lib.sampler_shapes(config, sampler, g["data"] * g["fsdp"])
    buckets = sorted({b for b in (1 << k for k in range(5, 20)) if b < s["prompt"]} | {s["prompt"]})
    buckets = buckets if t.costed else []
    c = compile_all(config, t, p, cfg, sampler, tuple(buckets))
    slots = max(c["decode"]["arguments"] - p["generate_params"], 0)  # the decode call's other arguments
    generate = max(c["prefill"]["peak"] + slots, c["insert"]["peak"] + p["generate_params"], c["decode"]["peak"])
    generate += c["decode"]["held_twice"]  # weights the sampler keeps in the decode's layouts too (layouts.py)
    tr = config.train
    decode_figures(c["decode"], p, t, s)
    for n in buckets:
        _prefill_figures(c[f"prefill@{n}"], p, t, s, n, sampler)
    train_s, decode_s = c["train_step"]["roofline_s"], c["decode"]["roofline_s"]
    roofline = None if train_s is None else {
        "train_step_s": train_s, "train_tokens_per_s": tr.batch_size * tr.max_len / train_s,
        "prefill_s": c["prefill"]["roofline_s"], "decode_step_s": decode_s, "decode_slots": s["slots"],
        "decode_tokens_per_s": s["slots"] / decode_s, "decode_hbm_step_s": c["decode"]["hbm_roofline_s"],
        "decode_hbm_tokens_per_s": c["decode"]["hbm_tokens_per_s"]}
    return {"target": {"name": t.name, "chips": t.chips, "hosts": t.hosts, "device_kind": c["decode"]["device_kind"],
                       "hbm_gb": t.hbm_gb, "bf16_flops": t.bf16_flops, "hbm_bytes_s": t.hbm_bytes_s},
            "device_gb": t.hbm_gb, "compiled": c, "train_compiled": c["train_step"]["peak"],
            "generate_compiled": generate, "roofline_estimate": roofline}


def decode_figures(fig: dict, p: dict, t: Target, s: dict) -> None:
    """A decode step's `slots` (over all chips), `hbm_floor_s` (the bytes it must read per chip, the weights (an
    untied input embedding only at the rows it looks up) and the live KV of every slot at the longest sequence the config reaches, over the chip's HBM bandwidth),
    `tokens_per_s` (slots / roofline_s) and `floor_over_roofline` (1 = XLA's program reads only what it must), and
    the same two by the HBM-only roofline (`hbm_tokens_per_s`, `floor_over_hbm_roofline`)."""
    fig["slots"] = s["slots"]
    fig["hbm_floor_s"] = (p["generate_params_read"] + p["kv_live"]) / t.hbm_bytes_s
    _rates(fig, s["slots"])


def _prefill_figures(fig: dict, p: dict, t: Target, s: dict, prompt: int, cfg) -> None:
    """A full insert's prefill at one prompt bucket: `rows`, `tokens` (rows x bucket), `hbm_floor_s` (the weights,
    and its new KV written, per chip), `tokens_per_s` and the floor's share of XLA's roofline."""
    g = p["generate_mesh"]
    kv = p["kv_live"] / max(s["prompt"] + s["budget"], 1) * prompt * s["rows"] / s["slots"]  # per chip
    fig.update(rows=s["rows"], tokens=s["rows"] * prompt)
    fig["hbm_floor_s"] = (p["generate_params_read"] + kv) / t.hbm_bytes_s
    matmul = cfg.num_params - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)  # per token
    fig["compute_floor_s"] = 2 * matmul * s["rows"] * prompt / (g["data"] * g["fsdp"] * g["tensor"]) / t.bf16_flops
    _rates(fig, s["rows"] * prompt)


def _rates(fig: dict, tokens: int) -> None:
    """Tokens/s and the floor's share, by XLA's roofline and by the HBM-only one (`hbm_`)."""
    floor = max(fig["hbm_floor_s"], fig.get("compute_floor_s", 0.0))
    for prefix in ("", "hbm_"):
        r = fig.get(prefix + "roofline_s")
        fig[prefix + "tokens_per_s"] = tokens / r if r else None
        fig[f"floor_over_{prefix}roofline"] = floor / r if r else None


class Programs:
    """The run's device programs for a target, each compiled once per model shape."""

    def __init__(self, config: ConfigDict, mesh, t: Target, gen=None):
        """`mesh`: the training mesh (the train step); `gen`: the generation mesh (the sampler's programs)."""
        self.config, self.mesh, self.t = config, mesh, t
        self.gen = gen or mesh
        self._compiled: dict = {}
        self._seconds: dict = {}  # (program, config) -> seconds to lower and compile it
        self._hlo: dict = {}

    @functools.cached_property
    def sampler(self):
        """The sampling model's config (the teacher's, if any)."""
        from s2d_jax.plan import estimate as plan_lib

        return plan_lib.model_config(self.config, system2=True)

    def mesh_for(self, name: str):
        return self.mesh if name == "train_step" else self.gen

    def figures(self, name: str, cfg, memory: bool = True) -> dict:
        """A program's figures; without `memory`, its costs only (the full-depth program is not compiled)."""
        mesh = self.mesh_for(name)
        fig = {"mesh": dict(mesh.shape), "device_kind": mesh.devices.flat[0].device_kind}
        costs = self.costs(name, cfg)
        fig["flops"] = fig["bytes_accessed"] = fig["roofline_s"] = fig["hbm_bytes"] = fig["hbm_roofline_s"] = None
        if costs:
            repeat = self.config.train.grad_accum if name == "train_step" else 1  # micro-steps: a loop counted once
            fig["flops"], fig["bytes_accessed"] = costs[0] * repeat, costs[1] * repeat
            fig["roofline_s"] = max(fig["flops"] / self.t.bf16_flops, fig["bytes_accessed"] / self.t.hbm_bytes_s)
            # HBM bytes from the whole program: what XLA keeps in VMEM depends on all of it (a 1-layer copy's
            # weights may fit there, the model's do not), and fixed loops are counted as often as they run
            steps = engine.CHUNK if name == "decode" else 1  # a decode call's steps share its entry and exit
            fig["hbm_bytes"] = hbm.hbm_bytes(self.hlo(name, cfg), steps)
            fig["hbm_roofline_s"] = max(fig["flops"] / self.t.bf16_flops, fig["hbm_bytes"] / self.t.hbm_bytes_s)
        return {**self.memory(name, cfg), **fig} if memory else fig

    def memory(self, name: str, cfg) -> dict:
        compiled = self.compiled(name, cfg)
        mem = compiled.memory_analysis()
        fig = {"arguments": mem.argument_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
               "outputs": mem.output_size_in_bytes, "aliases": mem.alias_size_in_bytes}
        fig["peak"] = fig["arguments"] + fig["outputs"] + fig["temporaries"] - fig["aliases"]
        fig["compile_s"] = round(self._seconds[(name, cfg)], 2)
        hlo = self.hlo(name, cfg)
        fig["collectives"] = collectives(hlo)
        fig["kernels"] = kernels(hlo)
        return fig

    def compiled(self, name: str, cfg):
        key = (name, cfg)
        if key not in self._compiled:
            try:
                program, _, bucket = name.partition("@")  # prefill@N: the prefill at prompt bucket N
                fn, args, kwargs = getattr(aot_programs, program)(self, cfg, *([int(bucket)] if bucket else []))
                with jax.set_mesh(self.mesh_for(name)):  # (only tracing: an eager op would run on the absent chips)
                    start = time.perf_counter()
                    self._compiled[key] = fn.lower(*args, **kwargs).compile()
                    self._seconds[key] = time.perf_counter() - start
            except S2DError:
                raise
            except Exception as e:  # a kernel that does not lower, a tile the chip cannot take: one line
                if os.environ.get("S2D_AOT_DEBUG"):
                    raise
                line = _first_line(e)
                if "RESOURCE_EXHAUSTED" in line or "out of memory" in line.lower():
                    line += f"; {REMEDIES['train' if name == 'train_step' else 'generate']}"
                raise S2DError(f"the {name.replace('_', ' ')} does not compile for {self.t.name} "
                               f"({cfg.num_layers} layers): {line}") from None
        return self._compiled[key]

    def hlo(self, name: str, cfg) -> str:
        """A program's optimised HLO text (read once: the collectives, the kernels and the HBM count use it)."""
        key = (name, cfg)
        if key not in self._hlo:
            self._hlo[key] = self.compiled(name, cfg).as_text()
        return self._hlo[key]

    def outputs(self, name: str, cfg):
        """A program's outputs as abstract arrays laid out as it lays them out (the next program's inputs)."""
        compiled = self.compiled(name, cfg)
        leaf = lambda x: hasattr(x, "shape") and not isinstance(x, tuple)  # (an int8 cache layer is a pair)
        infos, tree = jax.tree.flatten(compiled.out_info, is_leaf=leaf)
        return tree.unflatten([jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=s)
                               for i, s in zip(infos, jax.tree.leaves(compiled.output_shardings))])

    def costs(self, name: str, cfg) -> tuple[float, float]:
        """FLOPs and bytes accessed per chip at the full depth: the whole program's where its layers are unrolled
        (the decode runs them one by one; an unscanned model), else from unscanned copies of one and two periods
        of layers, extrapolated (XLA's cost analysis counts a loop body once; the period is 2 where local and global
        layers alternate). The copies are an estimate: what XLA keeps in VMEM differs between them (Llama-3.2-1B's
        int8 decode on a v5e-8: 6.6 GB by the copies against the whole program's 2.0)."""
        if not self.t.costed:  # (compile no copies for nothing)
            return None
        if name == "decode" or not cfg.scan_layers:
            return self.cost(name, cfg)
        p = period(cfg)
        short = lambda n: cfg.replace(num_layers=n, scan_layers=False,
                                      layer_types=cfg.layer_types[:n] if cfg.layer_types else cfg.layer_types)
        one, two = (self.cost(name, short(n)) for n in (p, 2 * p))
        if one is None or two is None:
            return None
        depth = cfg.num_layers / p
        return tuple(a + (depth - 1) * (b - a) for a, b in zip(one, two))


    def cost(self, name: str, cfg) -> tuple[float, float] | None:
        """FLOPs and bytes accessed of one compiled program, by the target compiler's analysis (XLA:GPU compiled
        without a GPU has none: None)."""
        cost = self.compiled(name, cfg).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
        return (float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))) if cost else None


def period(cfg) -> int:
    """The smallest run of layers that repeats (1; 2 for Gemma 2's local/global; 6 for Gemma 3's 5:1)."""
    kinds = [cfg.layer_type(n) for n in range(cfg.num_layers)]
    return next(p for p in range(1, len(kinds) + 1) if all(k == kinds[n % p] for n, k in enumerate(kinds)))


def collectives(hlo: str) -> dict[str, int]:
    """Collective ops in an optimised HLO module, by kind (async pairs counted once, at their start)."""
    found = {}
    for kind in COLLECTIVES:
        n = len(re.findall(rf"= [^=]*? {kind}(?:-start)?\(", hlo))
        if n:
            found[kind] = n
    return found


def kernels(hlo: str) -> dict[str, int]:
    """Custom calls in an optimised HLO module by target: Mosaic kernels (`tpu_custom_call`), cuDNN's, ..."""
    found: dict[str, int] = {}
    for target in re.findall(r'custom_call_target="([^"]+)"', hlo):
        found[target] = found.get(target, 0) + 1
    return found


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]
