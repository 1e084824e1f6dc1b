"""The rollout engine: continuous batching returns what static batches return, whatever the slots, neighbours or
devices; rows refilled mid-flight (sliding-window rings included) match transformers; compiles stay bounded."""

import string

import numpy as np
import pytest

import s2d_jax
from s2d_jax.model import PRESETS, init_model
from s2d_jax.sampling import Job, Sampler
from s2d_jax.tokenizer import byte_tokenizer
from conftest import FAMILIES

PROMPTS = ["a", "The quick brown fox", "0123456789 abcdefghij klmnop", "xyz xyz", "hello there", "Q: 2+2?",
           "lorem ipsum dolor sit amet", "z", "one two three four five six", "~~", "System 2", "abcabcabcabc"]
STOP = list(string.ascii_lowercase[:12])  # frequent enough that rows stop at many different steps


@pytest.fixture(scope="module")
def ragged():
    """The tiny model with 10 EOS ids: sampled rows end at very different steps."""
    cfg = PRESETS["tiny"].replace(eos_token_ids=tuple(range(100, 110)))
    return init_model(cfg, seed=1), byte_tokenizer()


def _ids(out):
    return [[s.token_ids for s in row] for row in out]


def test_continuous_batching_returns_what_static_batches_return_whatever_the_slots(ragged):
    model, tok = ragged
    kw = dict(n=3, temperature=1.0, max_new_tokens=40, seed=7, progress=False)
    static = Sampler(model, tok, max_batch=32, continuous=False)
    ref = static.generate(PROMPTS, **kw)
    lengths = [s.num_tokens for row in ref for s in row]
    assert min(lengths) < 10 and max(lengths) == 40  # a ragged workload: the point of refilling slots
    for slots in (2, 5, 8):
        sampler = Sampler(model, tok, max_batch=slots)
        assert _ids(sampler.generate(PROMPTS, **kw)) == _ids(ref), f"{slots} slots"
    few_static = Sampler(model, tok, max_batch=8, continuous=False)
    few = Sampler(model, tok, max_batch=8)
    assert _ids(few_static.generate(PROMPTS, **kw)) == _ids(few.generate(PROMPTS, **kw)) == _ids(ref)
    useful = lambda s: s.last_stats["live_rows"] / s.last_stats["rows"]
    assert few.last_stats["live_rows"] == few_static.last_stats["live_rows"] == sum(lengths)
    assert useful(few) > useful(few_static)  # refilled slots decode fewer dead rows


def test_stop_strings_and_eos_in_continuous_mode(ragged):
    model, tok = ragged
    kw = dict(n=2, temperature=1.0, max_new_tokens=32, seed=3, stop=STOP, progress=False)
    ref = Sampler(model, tok, max_batch=32, continuous=False).generate(PROMPTS, **kw)
    out = Sampler(model, tok, max_batch=3).generate(PROMPTS, **kw)
    assert [[(s.text, s.token_ids, s.finish_reason) for s in r] for r in out] == \
        [[(s.text, s.token_ids, s.finish_reason) for s in r] for r in ref]
    by_string = [s for r in out for s in r if s.finish_reason == "stop" and s.token_ids[-1] not in range(100, 110)]
    by_eos = [s for r in out for s in r if s.token_ids and s.token_ids[-1] in range(100, 110)]
    assert by_string and by_eos
    assert all(not any(c in s.text for c in STOP) for s in by_string)


def test_a_prompts_greedy_output_is_the_same_alone_and_in_any_slot(ragged):
    model, tok = ragged
    alone = [Sampler(model, tok, max_batch=1).generate([p], max_new_tokens=24, progress=False)[0][0].token_ids
             for p in PROMPTS]
    for slots in (3, 32):
        together = Sampler(model, tok, max_batch=slots).generate(PROMPTS, max_new_tokens=24, progress=False)
        assert [s.token_ids for (s,) in together] == alone


def test_compiles_are_bounded_by_buckets_not_by_prompts(ragged):
    model, tok = ragged
    sampler = Sampler(model, tok, max_batch=4)
    kw = dict(temperature=1.0, max_new_tokens=30, progress=False)
    for count in (1, 2, 4, 12):  # every prefill size bucket a refill can ask for, at this prompt bucket
        sampler.generate(PROMPTS[:count], seed=count, **kw)
    before = Sampler.traces()
    many = [p + str(k) for k in range(8) for p in PROMPTS]  # 96 prompts, other lengths, same buckets
    out = sampler.generate(many, n=2, seed=11, **kw)
    assert len(out) == 96 and Sampler.traces() == before


@pytest.mark.parametrize("family,attention", [(f, "auto") for f, (_, extra) in FAMILIES.items()
                                              if "sliding_window" in extra or "layer_types" in extra]
                         + [("gemma2", "ragged")])
def test_rows_refilled_mid_flight_match_transformers(hf_models, family, attention):
    """Two slots and a budget per prompt: later prompts enter while others decode, each row with its own cache
    index and position, sliding-window rings (shorter than the rows) included; also through the ragged decode
    kernel (interpreted: its rows of different lengths, soft-capped scores and per-row ring slots)."""
    from test_sampler import _hf_greedy

    path, ref = hf_models[family]
    tok = byte_tokenizer()
    model = s2d_jax.load_model(path)
    model.cfg = model.cfg.replace(attention=attention)
    sampler = Sampler(model, tok, max_batch=2)
    budgets = [3 + 5 * (k % 4) for k in range(len(PROMPTS))]  # 3, 8, 13, 18 tokens
    out = sampler.generate(PROMPTS, max_new_tokens=budgets, progress=False)
    for prompt, budget, (sample,) in zip(PROMPTS, budgets, out):
        expected = _hf_greedy(ref, tok(prompt).input_ids, budget, sampler.eos_ids, sampler.pad_id)
        ends = [k + 1 for k, t in enumerate(expected) if t in sampler.eos_ids]  # HF pads after the first EOS
        assert sample.token_ids == expected[:ends[0] if ends else budget], prompt


HEAD = f"[Question] {PROMPTS[2]} [Answers] {' / '.join(PROMPTS[4:7])} [Criterion] "
ITEMS = ["depth", "accuracy of it", "z", "helpfulness and relevance"]


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_a_shared_prefix_is_prefilled_once_and_matches_transformers(hf_models, family):
    """BSM's solve calls: one prompt head, one item each. The head is prefilled once per refill (three slots:
    the fourth call enters mid-flight and prefills it again, alone), the items' suffixes against a copy of it.
    Every sampled token's log probability equals transformers' on the whole prompt and the tokens before it
    (Gemma's sliding rings end at each row's own slot)."""
    import torch

    path, ref = hf_models[family]
    tok = byte_tokenizer()
    sampler = Sampler(s2d_jax.load_model(path), tok, max_batch=3)
    prompts = [HEAD + item for item in ITEMS]
    out = {}
    sampler.stream([Job(p, key=k, max_new_tokens=12, shared_prefix=len(HEAD), tag=k)
                    for k, p in enumerate(prompts)], lambda job, samples: out.__setitem__(job.tag, samples),
                   temperature=1.0, logprobs=True, progress=False)
    whole = sum(len(tok(p).input_ids) for p in prompts)  # one prefill per prompt without the shared prefix
    assert sampler.prefill_tokens <= whole - 2 * (len(HEAD) - 1)  # the head twice, not four times
    for k, prompt in enumerate(prompts):
        ids = tok(prompt).input_ids
        for sample in out[k]:
            with torch.no_grad():
                logits = ref(torch.tensor([ids + sample.token_ids])).logits[0, len(ids) - 1:-1].float()
            expected = torch.log_softmax(logits, -1)[torch.arange(len(sample.token_ids)), sample.token_ids]
            np.testing.assert_allclose(sample.logprobs, expected.numpy(), atol=2e-4, err_msg=prompt)


@pytest.mark.parametrize("attention", ["auto", "ragged"])
def test_eight_devices_continuous_equals_one(ragged, attention):
    """Also with the ragged decode kernel on each device's rows and kv heads (data 4 x tensor 2)."""
    model, tok = ragged
    mesh = s2d_jax.make_mesh(data=4, fsdp=1, tensor=2)
    sharded = init_model(model.cfg.replace(attention=attention), seed=1, mesh=mesh)
    kw = dict(n=2, temperature=0.9, max_new_tokens=24, seed=5, progress=False)
    one = Sampler(model, tok, max_batch=3).generate(PROMPTS, **kw)
    eight = Sampler(sharded, tok, mesh=mesh, max_batch=6).generate(PROMPTS, **kw)  # 8 slots: a multiple of 4 rows
    assert _ids(one) == _ids(eight)
    assert np.mean([s.num_tokens for r in one for s in r]) < 24
    shared = []  # shared-prefix prefill: prefix rows and suffix rows over the mesh too
    for sampler in (Sampler(model, tok, max_batch=3), Sampler(sharded, tok, mesh=mesh, max_batch=6)):
        out = {}
        sampler.stream([Job(HEAD + item, n=2, key=k, seed=5, max_new_tokens=24, shared_prefix=len(HEAD), tag=k)
                        for k, item in enumerate(ITEMS)], lambda job, samples: out.__setitem__(job.tag, samples),
                       temperature=0.9, progress=False)
        shared.append([[s.token_ids for s in out[k]] for k in range(len(ITEMS))])
    assert shared[0] == shared[1]


def _stage_by_stage(program, examples, sampler, n, seed, budgets, **sampling):
    """The runner before the engine streamed programs: one `generate` call per stage over every sample (with the
    same keys), a barrier between stages. Returns each record's stage outputs."""
    from s2d_jax.system2.programs import PARAMS, _key, plan_items

    states = [{**PARAMS, "input": e.input, **e.meta} for e in examples for _ in range(n)]
    ids = [(e.id, j) for e in examples for j in range(n)]
    outputs = [[] for _ in states]
    for index, stage in enumerate(program.stages):
        call = dict(max_new_tokens=budgets[stage.name], seed=seed * 1000 + index, progress=False, **sampling)
        if index == 0:
            outs = sampler.generate([stage.template.format(**states[i * n]) for i in range(len(examples))], n=n,
                                    prompt_keys=[_key(e.id) for e in examples], **call)
            flat = [o for row in outs for o in row]
        elif stage.fan_out:  # each record's items share the prompt up to the item: one prefill of it
            jobs = [(r, item) for r, st in enumerate(states) for item in plan_items(st[stage.fan_out], 5)]
            head = lambda r: len(stage.template.split("{item}")[0].format(**states[r]))
            outs = [None] * len(jobs)
            sampler.stream([Job(stage.template.format(**states[r], item=item), key=_key(*ids[r], item),
                                seed=call["seed"], max_new_tokens=call["max_new_tokens"], tag=k, shared_prefix=head(r))
                            for k, (r, item) in enumerate(jobs)],
                           lambda job, samples: outs.__setitem__(job.tag, samples), progress=False, **sampling)
            for r, st in enumerate(states):
                mine = [(item, o) for (q, item), (o,) in zip(jobs, outs) if q == r]
                outputs[r] += [o.text for _, o in mine]
                st[stage.name] = "\n\n".join(f"Criterion: {item}\n{o.text.strip()}" for item, o in mine)
            continue
        else:
            outs = sampler.generate([stage.template.format(**st) for st in states],
                                    prompt_keys=[_key(*i) for i in ids], **call)
            flat = [o for (o,) in outs]
        for st, out, o in zip(states, outputs, flat):
            st[stage.name] = o.text
            out.append(o.text)
    return outputs


@pytest.mark.parametrize("name", ["rar2", "bsm"])
def test_pipelined_programs_give_the_records_of_stage_by_stage_calls(ragged, name):
    from s2d_jax.system2.programs import get_program, run_program
    from s2d_jax.system2.tasks.base import Example

    model, tok = ragged
    program = get_program(name)
    meta = lambda k: {"question": f"Q{k}?", "response_a": "yes " * k, "response_b": "no"} if name == "bsm" else {}
    examples = [Example(f"e{k}", p, meta=meta(k)) for k, p in enumerate(PROMPTS[:5])]
    budgets = {s.name: 6 + 4 * i for i, s in enumerate(program.stages)}
    sampling = dict(temperature=1.0)
    sampler = Sampler(model, tok, max_batch=4)
    records = run_program(program, examples, sampler, 3, parse=lambda t: t, seed=2, chat=False, budgets=budgets,
                          progress=False, **sampling)
    expected = _stage_by_stage(program, examples, Sampler(model, tok, max_batch=32), 3, 2, budgets, **sampling)
    assert [[s["output"] for s in r["stages"]] for r in records] == expected
    assert [(r["id"], r["sample"]) for r in records] == [(e.id, j) for e in examples for j in range(3)]


def test_bucketed_shapes_are_few_and_pad_by_under_a_quarter():
    """Counted, not timed: a 128k context has 49 prompt lengths and 36 cache widths (it had ~1,000 widths);
    prefill rows come in power-of-two chunks (times the mesh's row divisor) that pad by at most a quarter."""
    from s2d_jax.sampling.cache import length_bucket, row_chunks, width_bucket

    context = 1 << 17
    lengths = {length_bucket(n, 32) for n in range(1, context + 1)}
    widths = {width_bucket(n) for n in range(1, context + 1)}
    assert len(lengths) == 49 and len(widths) == 36
    assert all(length_bucket(n, 32) <= max(32, 1.25 * n) for n in range(1, 5000))
    assert all(width_bucket(n) <= max(n + 127, 1.25 * n) for n in range(1, 5000))
    for multiple in (1, 2, 4):
        for rows in range(1, 130):
            chunks = row_chunks(rows, multiple)
            units = [c // multiple for c in chunks]
            assert all(c % multiple == 0 and u & (u - 1) == 0 for c, u in zip(chunks, units))
            assert units == sorted(units, reverse=True) and len(chunks) <= rows.bit_length()
            assert rows <= sum(chunks) <= max(1.25 * -(-rows // multiple), 1) * multiple
    assert row_chunks(5) == [4, 1] and row_chunks(7) == [8] and row_chunks(6, 2) == [4, 2]


def test_five_prompts_prefill_five_rows_not_eight(ragged):
    model, tok = ragged
    sampler = Sampler(model, tok, max_batch=8)
    prompts = [p.ljust(20, ".") for p in PROMPTS[:5]]  # one length bucket
    sampler.generate(prompts, max_new_tokens=4, progress=False)
    assert sampler.prefill_rows == 5 and sampler.prefill_padded == 5 * 32  # [4, 1]: no filler rows


def test_warmup_leaves_the_run_nothing_to_compile_and_changes_no_sample():
    """A model no other test compiled for (its own EOS set); budgets long enough to grow the cache, ragged ends
    so the tail shrinks the slots, through the CPU's finer shapes (eighths) and the quarters: after the warm-up the
    run traces nothing, and the samples are the ones a cold sampler draws with quarters alone and with no tail."""
    cfg = PRESETS["tiny"].replace(eos_token_ids=tuple(range(90, 104)))
    model, tok = init_model(cfg, seed=2), byte_tokenizer()
    kw = dict(n=2, temperature=1.0, max_new_tokens=150, seed=4, progress=False)  # the last rows end alone
    warm = Sampler(model, tok, max_batch=16, warmup=True)
    assert not warm.fine_tail  # this model's rows cost too little (engine.fine_tail): forced here
    warm.fine_tail = True  # tail shapes 16, 8 (an eighth, at least FINE_ROWS), 4, 1
    out = warm.generate(PROMPTS, **kw)
    assert warm.last_warmup["programs"] > 5 and warm.last_stats["traces"] == 0
    assert warm.last_stats["seconds"]["compile"] == 0.0
    quarters = Sampler(model, tok, max_batch=16)
    quarters.fine_tail = False  # an accelerator's tail: 16, 4, 1
    cold = Sampler(model, tok, max_batch=16, tail=False)
    assert _ids(quarters.generate(PROMPTS, **kw)) == _ids(out) == _ids(cold.generate(PROMPTS, **kw))
    rows = [s.last_stats["rows"] for s in (warm, quarters, cold)]
    assert rows[0] < rows[1] < rows[2], rows  # each finer tail decoded fewer rows
    assert warm.last_stats["live_rows"] == quarters.last_stats["live_rows"] == cold.last_stats["live_rows"]


def test_the_tail_shrinks_by_quarters_and_on_cpu_by_eighths():
    from s2d_jax.sampling.engine import fine_tail, tail_shapes, tail_slots

    assert [tail_slots(32, live, 1) for live in (1, 2, 3, 8, 9, 32)] == [2, 2, 8, 8, 32, 32]
    assert tail_slots(16, 1, 4) == 4 and tail_slots(8, 1, 4) == 8  # a multiple of the mesh's rows
    assert tail_slots(6, 1, 1) == 6
    # fine (CPU): every eighth of the slots too, at least FINE_ROWS (8) rows, each a multiple of the mesh's rows
    assert tail_shapes(64, 1, True) == [64, 56, 48, 40, 32, 24, 16, 8, 4, 1]
    assert tail_shapes(32, 1, True) == [32, 24, 16, 8, 2] and tail_shapes(8, 1, True) == [8, 2]
    assert tail_shapes(48, 4, True) == [48, 40, 32, 24, 16, 12, 8]
    assert tail_shapes(96, 1, True) == [96, 84, 72, 60, 48, 36, 24, 12, 6]
    assert [tail_slots(64, live, 1, True) for live in (1, 5, 9, 33, 57)] == [1, 8, 16, 40, 64]
    smol = PRESETS["smollm2-135m"].num_params  # fine on CPU once an eighth of the slots' products reach 1 GFLOP
    assert fine_tail("cpu", smol, 64) and fine_tail("cpu", smol, 32) and not fine_tail("cpu", smol, 16)
    assert not fine_tail("tpu", smol, 64) and not fine_tail("gpu", smol, 64)
    assert not fine_tail("cpu", PRESETS["toy"].num_params, 64)


def test_a_bfloat16_cache_keeps_greedy_outputs_close_to_float32(ragged):
    """`generate.cache_dtype=bfloat16` on a float32 model: keys and values are rounded once, as written; the
    greedy tokens may differ where two logits are within bf16's rounding, so it is measured, not required equal."""
    model, tok = ragged
    f32 = Sampler(model, tok, max_batch=4).generate(PROMPTS, max_new_tokens=16, progress=False)
    bf16 = Sampler(model, tok, max_batch=4, cache_dtype="bfloat16")
    out = bf16.generate(PROMPTS, max_new_tokens=16, progress=False)
    assert str(bf16.cache_dtype) == "bfloat16"
    same = np.mean([a.token_ids[:4] == b.token_ids[:4] for (a,), (b,) in zip(f32, out)])
    assert same >= 0.75


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_an_int8_cache_keeps_logprobs_close_through_refills_shared_prefixes_and_rings(hf_models, family):
    """`generate.cache_dtype=int8`: every key and value vector in int8 with its own scale, through the plain and the
    shared-prefix prefill, mid-flight refills, the tail and (Gemma 2) sliding-window rings. Each sampled token's log
    probability stays within int8's rounding of transformers' on the whole prompt and the tokens before it."""
    import torch

    from s2d_jax.sampling import engine

    path, ref = hf_models[family]
    tok = byte_tokenizer()
    sampler = Sampler(s2d_jax.load_model(path), tok, max_batch=3, cache_dtype="int8")
    jobs = [Job(HEAD + item, key=k, max_new_tokens=12, shared_prefix=len(HEAD), tag=k) for k, item in enumerate(ITEMS)]
    jobs += [Job(p, n=2, key=10 + k, max_new_tokens=20, tag=10 + k) for k, p in enumerate(PROMPTS[:5])]
    out = {}
    sampler.stream(jobs, lambda job, samples: out.__setitem__(job.tag, samples), temperature=1.0, logprobs=True,
                   progress=False)
    worst = 0.0
    for job in jobs:
        ids = tok(job.prompt).input_ids
        for sample in out[job.tag]:
            with torch.no_grad():
                logits = ref(torch.tensor([ids + sample.token_ids])).logits[0, len(ids) - 1:-1].float()
            expected = torch.log_softmax(logits, -1)[torch.arange(len(sample.token_ids)), sample.token_ids]
            worst = max(worst, float(np.abs(np.asarray(sample.logprobs) - expected.numpy()).max()))
    assert 0 < worst < 0.05, worst  # quantised (not exact), and close
    shape = engine.Shape(4, 16, 2, 8, 64, "int8", 0)
    cache = engine.empty(shape, (128, 128, 128)).cache
    assert cache.k[0].q.dtype == np.int8 and cache.k[0].scale.shape == (4, 2, 128)


def test_a_cpu_decode_step_copies_no_weight(ragged):
    """XLA:CPU copies a weight it must slice before a product (the MLP's stacked gate/up halves were, every step,
    2026-12-06): the compiled decode program makes no array as large as a weight matrix but the cache it writes
    in place."""
    import re

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from s2d_jax.sampling import cache as cache_lib
    from s2d_jax.sampling.engine import CHUNK, Shape, decode, empty
    from s2d_jax.sampling.select import Greedy

    model = ragged[0]
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    slots = empty(Shape(4, 16, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, "float32", 0),
                  cache_lib.layer_sizes(cfg, 128))
    hlo = decode.lower(graphdef, state, slots, jnp.int32(CHUNK), method=Greedy(), eos_ids=cfg.eos_token_ids,
                       pad_id=0).compile().as_text()
    smallest = min(x.size for x in jax.tree.leaves(state) if x.ndim >= 2)
    cache_shapes = {",".join(map(str, k.shape)) for k in slots.cache.k}
    large = [(shape, op) for shape, op in re.findall(r"= f32\[([\d,]+)\]\S* ([\w-]+)\(", hlo)
             if np.prod([int(d) for d in shape.split(",")]) >= smallest and shape not in cache_shapes
             and op not in ("parameter", "get-tuple-element", "bitcast", "tuple", "while", "copy-start", "copy-done")]
    assert not large, large
