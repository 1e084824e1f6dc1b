"""The sampler: parity with transformers' greedy generate, batching invariance, sharding, sampling statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import s2d_jax
from s2d_jax.errors import S2DError
from s2d_jax.model import PRESETS, init_model
from s2d_jax.sampling import Sampler, Sampling
from s2d_jax.sampling.cache import prefill as _prefill
from s2d_jax.tokenizer import byte_tokenizer
from conftest import FAMILIES

PROMPTS = ["a", "The quick brown fox", "0123456789 abcdefghij klmnop", "xyz xyz"]


def _hf_greedy(ref, ids, max_new, eos_ids, pad_id):
    import torch

    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                           eos_token_id=list(eos_ids), pad_token_id=pad_id)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers_generate(hf_models, family):
    path, ref = hf_models[family]
    tok = byte_tokenizer()
    sampler = Sampler(s2d_jax.load_model(path), tok)
    out = sampler.generate(PROMPTS, max_new_tokens=20, progress=False)
    for prompt, (sample,) in zip(PROMPTS, out):
        expected = _hf_greedy(ref, tok(prompt).input_ids, 20, sampler.eos_ids, sampler.pad_id)
        ends = [k + 1 for k, t in enumerate(expected) if t in sampler.eos_ids]  # HF pads after the first EOS
        assert sample.token_ids == expected[:ends[0] if ends else len(expected)]


@pytest.fixture(scope="module")
def tiny():
    return init_model(PRESETS["tiny"], seed=1), byte_tokenizer()


def test_greedy_is_the_same_alone_or_in_a_mixed_batch_whatever_the_bucket(tiny):
    model, tok = tiny
    alone = [Sampler(model, tok, min_prompt_bucket=b).generate([PROMPTS[1]], max_new_tokens=12, progress=False)[0][0]
             for b in (32, 128)]
    mixed = Sampler(model, tok).generate(PROMPTS, max_new_tokens=12, progress=False)[1][0]
    assert alone[0].token_ids == alone[1].token_ids == mixed.token_ids


def test_second_call_in_the_same_bucket_does_not_compile(tiny):
    model, tok = tiny
    sampler = Sampler(model, tok)
    sampler.generate(["hello", "world!"], max_new_tokens=10, progress=False)
    before = Sampler.traces()
    sampler.generate(["other", "prompts here"], max_new_tokens=12, seed=5, progress=False)
    assert Sampler.traces() == before
    sampler.generate(["x" * 40], max_new_tokens=10, progress=False)  # a longer prompt bucket compiles again
    assert Sampler.traces() > before


def test_n_samples_share_one_prefill_and_results_do_not_depend_on_batching(tiny):
    model, tok = tiny
    big = Sampler(model, tok, max_batch=32)
    out = big.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=3, progress=False)
    assert big.prefill_rows == 4  # four prompts prefilled once each, not 16 rows
    small = Sampler(model, tok, max_batch=4)  # one prompt per batch
    again = small.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=3, progress=False)
    assert [[s.token_ids for s in row] for row in out] == [[s.token_ids for s in row] for row in again]
    assert len({tuple(s.token_ids) for s in out[0]}) > 1  # samples of one prompt differ
    other_seed = big.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=4, progress=False)
    assert [s.token_ids for s in other_seed[0]] != [s.token_ids for s in out[0]]


def test_eight_devices_give_the_same_outputs_and_split_the_cache(tiny):
    model, tok = tiny
    mesh = s2d_jax.make_mesh(data=4, fsdp=1, tensor=2)
    sharded = init_model(model.cfg, seed=1, mesh=mesh)
    one = Sampler(model, tok).generate(PROMPTS, n=2, temperature=0.8, top_k=20, max_new_tokens=10, progress=False)
    eight = Sampler(sharded, tok, mesh=mesh).generate(PROMPTS, n=2, temperature=0.8, top_k=20, max_new_tokens=10,
                                                      progress=False)
    assert [[s.token_ids for s in r] for r in one] == [[s.token_ids for s in r] for r in eight]
    sampler = Sampler(sharded, tok, mesh=mesh)
    tokens = jnp.zeros((8, 32), jnp.int32)
    with jax.set_mesh(mesh):
        put = sampler._put
        _, cache = _prefill(sampler.graphdef, sampler.state, put(tokens), put(tokens), put(tokens + 1), max_len=64)
    k = cache.k[0]
    assert k.shape == (8, 2, 64, 16)
    assert all(s.data.nbytes == k.nbytes // 8 for s in k.addressable_shards)


def test_top_k_and_top_p_sample_the_renormalised_distribution():
    logits = jnp.log(jnp.asarray([0.30, 0.25, 0.20, 0.10, 0.08, 0.05, 0.02], jnp.float32))[None].repeat(20000, 0)
    keys = jax.random.split(jax.random.key(0), 20000)
    for method, allowed in [(Sampling(1.0, top_k=3), 3), (Sampling(1.0, top_p=0.7), 3),
                            (Sampling(1.0, top_k=5, top_p=0.85), 4), (Sampling(1.0), 7)]:
        draws = np.asarray(method.select(logits, keys))  # top-p acts on the top-k renormalised
        assert draws.max() < allowed  # nothing outside the allowed set, ever
        p = np.asarray([0.30, 0.25, 0.20, 0.10, 0.08, 0.05, 0.02])[:allowed]
        expected = p / p.sum() * len(draws)
        counts = np.bincount(draws, minlength=allowed)
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 25.0  # p < 0.001 for up to 6 degrees of freedom
    again = np.asarray(Sampling(1.0, top_k=3).select(logits, keys))
    assert (again == np.asarray(Sampling(1.0, top_k=3).select(logits, keys))).all()


def test_eos_stops_a_row_and_masks_what_follows(tiny):
    model, tok = tiny
    free = Sampler(model, tok).generate([PROMPTS[2]], max_new_tokens=12, progress=False)[0][0]
    assert free.finish_reason == "length"
    eos = free.token_ids[3]
    first = free.token_ids.index(eos)
    model_eos = init_model(model.cfg.replace(eos_token_ids=(eos,)), seed=1)
    sampler = Sampler(model_eos, tok)
    out = sampler.generate([PROMPTS[2], PROMPTS[0]], max_new_tokens=12, progress=False)[0][0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:first + 1] and out.num_tokens == first + 1


def test_stop_strings_cut_text_and_tokens(tiny):
    model, tok = tiny
    sampler = Sampler(model, tok)
    free = sampler.generate(["hello there"], max_new_tokens=40, progress=False)[0][0]
    text = free.text
    stop = text[20:22]
    cut = text.find(stop)
    out = sampler.generate(["hello there"], max_new_tokens=40, stop=[stop, "\x00never"], progress=False)[0][0]
    assert out.finish_reason == "stop" and out.text == text[:cut]
    assert out.token_ids == free.token_ids[:out.num_tokens] and out.num_tokens < 40
    assert stop in tok.decode(out.token_ids) and stop not in tok.decode(out.token_ids[:-1])


def test_logprobs_are_the_chosen_tokens_log_probabilities(tiny):
    model, tok = tiny
    sample = Sampler(model, tok).generate(["abc"], max_new_tokens=3, logprobs=True, progress=False)[0][0]
    ids = jnp.asarray([tok("abc").input_ids + sample.token_ids], jnp.int32)
    logp = jax.nn.log_softmax(model(ids)[0], -1)
    expect = [float(logp[2 + t, sample.token_ids[t]]) for t in range(3)]
    np.testing.assert_allclose(sample.logprobs, expect, atol=1e-4)


def test_bad_calls(tiny):
    model, tok = tiny
    sampler = Sampler(model, tok)
    assert sampler.generate([], max_new_tokens=4) == []
    with pytest.raises(S2DError, match=r"prompt 1: 1020 tokens \+ max_new_tokens=8 = 1028 exceeds the model's context of 1024"):
        sampler.generate(["ok", "y" * 1020], max_new_tokens=8, progress=False)
    with pytest.raises(S2DError, match="prompt 0: empty"):
        sampler.generate([""], progress=False)
    with pytest.raises(S2DError, match="top_p=1.5"):
        sampler.generate(["a"], temperature=1.0, top_p=1.5)
    with pytest.raises(S2DError, match="expected a list of strings"):
        sampler.generate("a")


def test_a_prompt_whose_bucket_fills_the_context_still_decodes(tiny):
    """A 600-token prompt's bucket (1024) is the tiny model's whole context: the bucket shrinks to leave room for
    the new tokens (it used to leave none, and the decode loop made no progress)."""
    model, tok = tiny
    sampler = Sampler(model, tok)
    (short,), (long,) = sampler.generate(["y" * 600, "z" * 1000], max_new_tokens=24, progress=False)
    assert short.num_tokens >= 1 and long.num_tokens >= 1
    (alone,), = sampler.generate(["y" * 600], max_new_tokens=24, progress=False)
    assert alone.token_ids == short.token_ids  # the same tokens next to a 1000-token prompt as alone


@pytest.mark.parametrize("vocab,rows", [(1000, 20000), (2053, 8000)])
def test_the_two_level_draw_is_the_one_level_inverse_cdf(vocab, rows):
    """Over a vocabulary of 1,000 (8 blocks of 125) and of 2,053 (a prime: 17 blocks of 128, the last padded) with
    tokens of probability 0 among the others: the draw by block then token equals one cumulative sum over the
    vocabulary inverted at the same uniform (but where the two sums round differently), follows the distribution,
    and never lands on a token without mass."""
    from s2d_jax.sampling.select import blocks, categorical

    assert blocks(vocab) == {1000: (8, 125), 2053: (17, 128)}[vocab]
    rng = np.random.default_rng(0)
    p = rng.random(vocab) ** 4 * (rng.random(vocab) > 0.3)
    p[vocab - 100:] = 0.0  # the last block's tail (and the padding after it) have no mass
    logits = jnp.log(jnp.asarray(p / p.sum(), jnp.float32))[None].repeat(rows, 0)
    keys = jax.random.split(jax.random.key(1), rows)
    draws = np.asarray(jax.jit(categorical)(keys, logits))
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)[:, None] * cdf[:, -1:]
    one_level = np.asarray(jnp.sum(cdf <= jnp.minimum(u, cdf[:, -1:] * (1 - 1e-6)), axis=-1))
    assert np.mean(draws == one_level) > 0.999
    assert p[draws].min() > 0
    expected = p / p.sum() * len(draws)
    counts = np.bincount(draws, minlength=vocab)
    seen = expected > 5
    chi2 = ((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum()
    assert chi2 < seen.sum() + 5 * np.sqrt(2 * seen.sum())  # within 5 standard deviations of its mean


def test_a_draw_over_a_sharded_vocabulary_gathers_only_the_block_masses():
    """Logits sharded over 8 devices along Llama 3's vocabulary (128,256 = 8 x 16,032 tokens): each device holds
    whole blocks, so the compiled draw moves only the `[rows, blocks]` masses between devices, never the rows'
    probabilities (blocks of 128 straddled the devices' shards, and XLA gathered `[rows, 64,128]` on each)."""
    import re

    from jax.sharding import NamedSharding, PartitionSpec as P

    from s2d_jax.sampling.select import blocks, categorical

    mesh = jax.make_mesh((8,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
    rows, vocab = 16, 128256
    n, width = blocks(vocab)
    keys = jax.random.split(jax.random.key(0), rows)
    f = jax.jit(categorical, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "tensor"))))
    text = f.lower(keys, jax.ShapeDtypeStruct((rows, vocab), jnp.float32)).compile().as_text()
    moved = re.findall(r"= \w+\[([\d,]+)\]\S* (?:all-gather|all-to-all|collective-permute|all-reduce)\(", text)
    assert moved and max(np.prod([int(d) for d in shape.split(",")]) for shape in moved) <= rows * max(n, width)


def test_argmax_by_two_reductions_is_jnp_argmax():
    """Ties (the first index wins), a NaN (the first NaN wins), rows of -inf, bfloat16, and the caller's max."""
    from s2d_jax.sampling.select import argmax

    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4, 1000)).round(1), jnp.float32)  # many ties
    x = x.at[2, 1, 17].set(jnp.nan).at[2, 1, 400].set(jnp.nan).at[3, 0].set(-jnp.inf)
    for y in (x, x.astype(jnp.bfloat16)):
        np.testing.assert_array_equal(jax.jit(argmax)(y), jnp.argmax(y, -1))
    np.testing.assert_array_equal(argmax(x, jnp.max(x, -1, keepdims=True)), jnp.argmax(x, -1))
    assert int(argmax(x)[2, 1]) == 17 and int(argmax(x)[3, 0]) == 0


def test_weights_in_the_decode_s_own_layouts_give_the_same_samples(tiny, monkeypatch):
    """`sampling/layouts.py`: XLA:CPU's decode takes every weight as it is laid out (its AUTO choice is the
    default: no copy); a QKV weight laid out another way (as XLA:TPU asks on a v5p-64) is taken as it is by every
    program the sampler compiles, and the samples do not change."""
    from jax.experimental.layout import Format, Layout

    from s2d_jax.sampling import cache as cache_lib, engine, layouts
    from s2d_jax.sampling.select import Greedy

    model, tok = tiny
    sampler = Sampler(model, tok, max_batch=4)
    queue = [type("Request", (), {"budget": 12})()]
    kept = layouts.for_decode(sampler, engine.slot_shape(sampler, queue), Greedy(), False)
    assert all(a is b for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(sampler.state)))
    # another sampler of the model (the eval stage builds one a system): the layouts are not compiled for again
    lowered = []
    listen = lambda event, *_, **__: lowered.append(event) if event.endswith("jaxpr_to_mlir_module_duration") else 0
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        again = Sampler(model, tok, max_batch=4)
        layouts.for_decode(again, engine.slot_shape(again, queue), Greedy(), False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert not lowered

    expected = sampler.generate(PROMPTS, max_new_tokens=12, progress=False)
    other = Sampler(model, tok, max_batch=4)
    qkv = lambda path: "qkv" in jax.tree_util.keystr(path)
    order = lambda x: (*range(x.ndim - 4), x.ndim - 3, x.ndim - 2, x.ndim - 4, x.ndim - 1)  # embed after the heads
    formats = jax.tree_util.tree_map_with_path(
        lambda p, x: Format(Layout(order(x)) if qkv(p) else None, x.sharding), other.state)
    other.state = layouts.place(other.state, formats)
    laid = [x for p, x in jax.tree_util.tree_flatten_with_path(other.state)[0] if qkv(p)]
    assert laid and all(x.format.layout.major_to_minor == order(x) != tuple(range(x.ndim)) for x in laid)
    assert [[s.token_ids for s in row] for row in other.generate(PROMPTS, max_new_tokens=12, progress=False)] == \
        [[s.token_ids for s in row] for row in expected]
    after = [x for p, x in jax.tree_util.tree_flatten_with_path(other.state)[0] if qkv(p)]
    assert all(a is b for a, b in zip(after, laid))
    slots = engine.empty(engine.slot_shape(other, queue), cache_lib.layer_sizes(model.cfg, cache_lib.LIVE_BUCKET))
    compiled = engine.decode.lower(other.graphdef, other.state, slots, jnp.int32(0), method=Greedy(),
                                   eos_ids=other.eos_ids, pad_id=other.pad_id).compile()
    taken = [f for p, f in jax.tree_util.tree_flatten_with_path(
        compiled.input_formats[0][0], is_leaf=lambda f: isinstance(f, Format))[0] if qkv(p)]
    assert [f.layout.major_to_minor for f in taken] == [order(x) for x in laid]  # the program takes them as laid

    # the sampler's own path on a platform in PLATFORMS (as on a TPU), weights sharded over 8 devices
    mesh = s2d_jax.make_mesh(data=4, fsdp=1, tensor=2)
    sharded = init_model(model.cfg, seed=1, mesh=mesh)
    args = dict(n=2, temperature=0.8, top_k=20, max_new_tokens=10, progress=False)
    plain = Sampler(sharded, tok, mesh=mesh).generate(PROMPTS, **args)
    monkeypatch.setattr(layouts, "PLATFORMS", ("cpu",))
    asked = Sampler(sharded, tok, mesh=mesh)
    assert not asked.laid_out
    ids = lambda out: [[s.token_ids for s in row] for row in out]
    assert ids(asked.generate(PROMPTS, **args)) == ids(plain)
    assert asked.laid_out
