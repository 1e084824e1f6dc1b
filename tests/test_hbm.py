"""The HBM-only byte count (`plan/hbm.py`): its rules on a small HLO module written here, and on programs XLA:TPU
compiles from this CPU (libtpu), where it must find the bytes the program cannot avoid and XLA's own count more."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2d_jax.plan import aot, hbm

# A step loop (run 4 times per call) whose body prefetches a weight into VMEM (S(1)) and multiplies there, reads a
# slice of an HBM table, updates an HBM buffer in place, and runs an inner loop of 3 trips that writes to HBM; the
# entry copies one array outside the loop.
HLO = """HloModule m

%fused_slice (p0: f32[1024,256], p1: s32[]) -> f32[8,256] {
  %p0 = f32[1024,256]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c = s32[] constant(0)
  ROOT %ds = f32[8,256]{1,0} dynamic-slice(%p0, %p1, %c), dynamic_slice_sizes={8,256}
}

%fused_dot (p0: f32[8,256], p1: f32[256,256]) -> f32[8,256] {
  %p0 = f32[8,256]{1,0} parameter(0)
  %p1 = f32[256,256]{1,0} parameter(1)
  ROOT %d = f32[8,256]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_update (p0: f32[64,256], p1: f32[8,256], p2: s32[]) -> f32[64,256] {
  %p0 = f32[64,256]{1,0} parameter(0)
  %p1 = f32[8,256]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c = s32[] constant(0)
  ROOT %dus = f32[64,256]{1,0} dynamic-update-slice(%p0, %p1, %p2, %c)
}

%fused_neg (p0: f32[8,256]) -> f32[8,256] {
  %p0 = f32[8,256]{1,0} parameter(0)
  ROOT %n = f32[8,256]{1,0} negate(%p0)
}

%inner (p: (s32[], f32[8,256])) -> (s32[], f32[8,256]) {
  %p = (s32[], f32[8,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,256]{1,0} get-tuple-element(%p), index=1
  %y = f32[8,256]{1,0} fusion(%x), kind=kLoop, calls=%fused_neg
  ROOT %t = (s32[], f32[8,256]{1,0}) tuple(%i, %y)
}

%inner_cond (p: (s32[], f32[8,256])) -> pred[] {
  %p = (s32[], f32[8,256]{1,0}) parameter(0)
  ROOT %b = pred[] constant(true)
}

%body (p: (s32[], f32[1024,256], f32[256,256], f32[64,256])) -> (s32[], f32[1024,256], f32[256,256], f32[64,256]) {
  %p = (s32[], f32[1024,256]{1,0}, f32[256,256]{1,0}, f32[64,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %table = f32[1024,256]{1,0} get-tuple-element(%p), index=1
  %w = f32[256,256]{1,0} get-tuple-element(%p), index=2
  %buf = f32[64,256]{1,0} get-tuple-element(%p), index=3
  %cs = (f32[256,256]{1,0:S(1)}, f32[256,256]{1,0}, u32[]{:S(2)}) copy-start(%w)
  %rows = f32[8,256]{1,0:S(1)} fusion(%table, %i), kind=kLoop, calls=%fused_slice
  %wv = f32[256,256]{1,0:S(1)} copy-done(%cs)
  %h = f32[8,256]{1,0} fusion(%rows, %wv), kind=kOutput, calls=%fused_dot
  %buf2 = f32[64,256]{1,0} fusion(%buf, %h, %i), kind=kLoop, calls=%fused_update
  %it = (s32[], f32[8,256]{1,0}) tuple(%i, %h)
  %loop = (s32[], f32[8,256]{1,0}) while(%it), condition=%inner_cond, body=%inner, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %t = (s32[], f32[1024,256]{1,0}, f32[256,256]{1,0}, f32[64,256]{1,0}) tuple(%i, %table, %w, %buf2)
}

%cond (p: (s32[], f32[1024,256], f32[256,256], f32[64,256])) -> pred[] {
  %p = (s32[], f32[1024,256]{1,0}, f32[256,256]{1,0}, f32[64,256]{1,0}) parameter(0)
  ROOT %b = pred[] constant(true)
}

ENTRY %main (a: f32[1024,256], b: f32[256,256], c: f32[64,256]) -> f32[64,256] {
  %a = f32[1024,256]{1,0} parameter(0)
  %b = f32[256,256]{1,0} parameter(1)
  %c = f32[64,256]{1,0} parameter(2)
  %c2 = f32[64,256]{1,0} copy(%c)
  %zero = s32[] constant(0)
  %init = (s32[], f32[1024,256]{1,0}, f32[256,256]{1,0}, f32[64,256]{1,0}) tuple(%zero, %a, %b, %c2)
  %w = (s32[], f32[1024,256]{1,0}, f32[256,256]{1,0}, f32[64,256]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[64,256]{1,0} get-tuple-element(%w), index=3
}
"""


def test_the_rules_on_a_written_module():
    rows, weight, buf = 8 * 256 * 4, 256 * 256 * 4, 64 * 256 * 4
    per_step = {
        "copy-start": weight,  # HBM -> VMEM once; the product then reads VMEM
        "fusion_slice": rows,  # 8 rows of the 1024-row table, into VMEM
        "fusion_dot": rows,  # its result written to HBM (its operands are in VMEM)
        "fusion_update": 2 * rows,  # in place: the update read, and written over the buffer's rows
        "inner": 3 * 2 * rows,  # the inner loop's 3 trips, each reading and writing 8 rows
    }
    found = {name: b for b, _, name, _ in hbm.breakdown(HLO, steps=4)}
    assert found["cs"] == per_step["copy-start"] and found["rows"] == per_step["fusion_slice"]
    assert found["h"] == per_step["fusion_dot"] and found["buf2"] == per_step["fusion_update"]
    assert found["y"] == per_step["inner"]
    assert found["c2"] == 2 * buf / 4  # the entry's copy (read and written) shared by the call's 4 steps
    assert hbm.hbm_bytes(HLO, steps=4) == sum(per_step.values()) + 2 * buf / 4
    assert hbm.leaves("(f32[2,3]{1,0:T(8,128)S(1)}, bf16[4]{0}, s4[8], u32[]{:S(2)}, s32[])") == [
        (24, 1), (8, 0), (4.0, 0), (4, None), (4, None)]


@pytest.fixture(scope="module")
def chips():
    return aot.devices(aot.target("v5e-8"))


def _compiled(fn, chips, *shapes):
    mesh = jax.sharding.Mesh(np.array(chips[:1]), ("x",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = [jax.ShapeDtypeStruct(s, d, sharding=replicated) for s, d in shapes]
    return jax.jit(fn).lower(*args).compile()


def test_a_matmul_on_the_tpu_moves_its_operands_and_result_once(chips):
    """A bf16 [64, 4096] x [4096, 4096] product compiled for one v5e chip: the HBM count is the weight, the input
    and the result once each (to within a tenth: XLA may add a small buffer); XLA's own count is larger."""
    compiled = _compiled(lambda x, w: x @ w, chips, ((64, 4096), jnp.bfloat16), ((4096, 4096), jnp.bfloat16))
    need = (2 * 64 * 4096 + 4096 * 4096) * 2
    got = hbm.hbm_bytes(compiled.as_text())
    xla = compiled.cost_analysis()
    xla = (xla[0] if isinstance(xla, (list, tuple)) else xla)["bytes accessed"]
    assert need <= got <= 1.1 * need, (got, need)
    assert got <= xla


@pytest.mark.parametrize("cache_dtype", ["", "int8"])
def test_the_decode_step_leaves_the_cache_in_hbm(tmp_path, chips, cache_dtype):
    """The sampler's decode program for a v5e-8 (a small Llama, 2 layers, 64 slots of 512; bf16 and int8 caches):
    the new keys and values reach the cache through the write kernel in place, and attention reads it where it
    lies; no async copy moves a whole cache layer into VMEM and back (what XLA did with a per-row scatter: a third
    more HBM traffic per layer at the 8B shape), so a step's HBM bytes stay within the weights, the live KV and a
    small remainder; the slots' logits stay sharded over the vocabulary and are donated. The only loop is the call's
    loop over steps: the valid mask and an int8 cache's scales take
    each row's slot by a select, where a per-row scatter was a loop over the 64 rows in every step (and per layer
    for the scales: by XLA:TPU's own cycle estimates ~0.6M cycles each at the 8B shape)."""
    import re

    from test_aot import _llama

    from s2d_jax.config import load_config
    from s2d_jax.plan import estimate as plan_lib

    config = load_config("configs/rar2_last_letters.py", [f"model.path={_llama(tmp_path)}", "generate.max_batch=64",
                                                          "train.max_len=256", f"generate.cache_dtype={cache_dtype}"])
    t = aot.target("v5e-8")
    p = aot.target_plan(config, t)
    cfg = plan_lib.model_config(config, system2=True).replace(platform="tpu", num_layers=2, scan_layers=False)
    hlo = aot.programs(config, t, p).compiled("decode", cfg).as_text()
    assert len(re.findall(r"name=\"kv_cache_write\"|kv_cache_write[.\w]* = ", hlo)) >= 4  # k and v, per layer
    assert re.findall(r" while\(.*?op_name=\"([^\"]*)\"", hlo) == ["jit(decode)/while"]
    # the slots' logits stay as the head leaves them (the vocabulary over tensor) and are donated to the output
    logits = re.search(r"f32\[\d+,(\d+)\]\S* parameter\((\d+)\), metadata=\{op_name=\"slots.logits\"", hlo)
    assert int(logits.group(1)) * p["generate_mesh"]["tensor"] == cfg.vocab_size
    assert re.search(rf"input_output_alias=\{{[^\n]*: \({logits.group(2)}, \{{\}}", hlo)
    g = p["generate_mesh"]
    layer = 64 // g["data"] * max(cfg.num_kv_heads // g["tensor"], 1) * 512 * cfg.head_dim * 2  # one layer's keys
    moved = [b for b, op, _, _ in hbm.breakdown(hlo) if op in ("copy-start", "slice-start")]
    assert moved and max(moved) < layer, (max(moved), layer)


def test_a_scan_counts_its_layers(chips):
    """A scan over 8 layers of a [4096, 4096] bf16 weight (XLA:TPU keeps the loop, with no trip count annotated):
    the count reads its trip count from the loop's condition, so each layer's weight counts once."""
    def layers(x, w):
        return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0]

    compiled = _compiled(layers, chips, ((64, 4096), jnp.bfloat16), ((8, 4096, 4096), jnp.bfloat16))
    assert " while(" in compiled.as_text()
    weights = 8 * 4096 * 4096 * 2
    assert weights <= hbm.hbm_bytes(compiled.as_text()) <= 1.1 * weights


@pytest.fixture
def uncached():
    with aot.uncached():
        yield


def test_the_decode_on_a_v5p_64_takes_its_weights_as_laid_out(tmp_path, monkeypatch, uncached):
    """Llama-3-8B's shape (2 layers) on a v5p-64, generation mesh data 8 x tensor 4: with the weights in their
    default layouts XLA:TPU copies the stacked QKV weight into another layout at the start of every decode call;
    laid out as the decode asks (sampling/layouts.py, as the sampler does on a TPU), no weight is copied, the
    prefill takes the same layouts, and the decode's temporaries shrink by at least that copy."""
    import re

    from test_aot import _llama

    from s2d_jax.config import load_config
    from s2d_jax.model import PRESETS
    from s2d_jax.plan import aot_programs, estimate as plan_lib
    from s2d_jax.sampling import layouts

    shape = PRESETS["llama3-8b"]  # its widths, 2 layers
    path = _llama(tmp_path, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                  num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads, num_hidden_layers=2,
                  head_dim=shape.head_dim, vocab_size=shape.vocab_size, max_position_embeddings=8192)
    config = load_config("configs/rar2_last_letters.py", [f"model.path={path}", "plan.topology=v5p-64"])
    t = aot.target("v5p-64")
    p = aot.target_plan(config, t)
    assert p["generate_mesh"]["tensor"] == 4 and p["generate_mesh"]["data"] == 8
    cfg = plan_lib.model_config(config, system2=True).replace(platform="tpu")
    copies = lambda hlo: [m.group(1) for m in re.finditer(r"= (\w+\[[\d,]+\])\{[^}]*\} copy\(%param\.[^\n]*", hlo)
                          if 'op_name="slots.' not in m.group(0)]  # weights (a slot array may be: the keys' 512 bytes)
    laid = aot.programs(config, t, p)
    assert not copies(laid.hlo("decode", cfg)) and not copies(laid.hlo("prefill", cfg))
    qkv = [f.layout.major_to_minor for path, f in jax.tree_util.tree_flatten_with_path(
        laid.compiled("decode", cfg).input_formats[0][0], is_leaf=lambda f: hasattr(f, "layout"))[0]
        if "qkv" in jax.tree_util.keystr(path)]
    assert qkv == [(0, 2, 3, 1, 4)]  # [layers, kv heads, group + 2, embed, head_dim] in memory
    shard = 2 * 4096 * 2 * 6 * 128 * 2  # bytes of the stacked QKV weight a chip holds
    with jax.set_mesh(laid.gen):
        assert aot_programs.held_twice(laid, cfg) == shard  # the sampler's second copy, counted in the plan

    monkeypatch.setattr(layouts, "PLATFORMS", ())
    default = aot.programs(config, t, p)
    (copied,) = copies(default.hlo("decode", cfg))
    assert copied == "bf16[2,4096,2,6,128]"  # the whole stacked QKV shard, every call
    saved = default.memory("decode", cfg)["temporaries"] - laid.memory("decode", cfg)["temporaries"]
    assert saved >= shard
