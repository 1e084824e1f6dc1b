"""The harness's model over ours: log-likelihoods from the batched, padded forward pass equal a plain per-row
computation; greedy generation stops at the harness's strings; rolling log-likelihood sums its windows."""

import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from s2d_jax.harness import HarnessLM
from s2d_jax.model import PRESETS, init_model
from s2d_jax.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def lm():
    tok = byte_tokenizer()
    model = init_model(PRESETS["tiny"], seed=1)
    return HarnessLM(model, tok, max_batch=2)


def _plain(lm, context: str, continuation: str) -> tuple[float, bool]:
    """The continuation's log-probability from one unpadded row, token by token (the context's trailing spaces
    moved to the continuation, as the harness does)."""
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
    ctx, whole = lm.tok_encode(context), lm.tok_encode(context + continuation)
    logits = np.asarray(lm.model(jnp.asarray([whole[:-1]])))[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    picks = range(len(ctx) - 1, len(whole) - 1)
    return (float(sum(logp[i, whole[i + 1]] for i in picks)),
            all(int(np.argmax(logits[i])) == whole[i + 1] for i in picks))


def test_loglikelihood_equals_a_plain_forward_pass(lm):
    pairs = [("Take the last letters", " of each word"), ("a", "b"), ("Kalo Mire Tosu: ", "oeu"),
             ("x" * 40, " and a longer continuation than its context")]  # 3 batches of 2 rows, padded widths
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, k) for k, p in enumerate(pairs)])
    for (score, greedy), pair in zip(got, pairs):
        want, want_greedy = _plain(lm, *pair)
        assert score == pytest.approx(want, rel=1e-4, abs=1e-3) and greedy == want_greedy


def test_generate_until_stops_at_the_harness_strings(lm):
    free = lm.generate_until([Instance("generate_until", {}, ("Hello", {"max_gen_toks": 12}), 0)])[0]
    assert free, "the random model generates something"
    stop = free[len(free) // 2]
    cut = lm.generate_until([Instance("generate_until", {}, ("Hello", {"until": [stop], "max_gen_toks": 12}), 0)])[0]
    assert cut == free.split(stop)[0]


def test_rolling_loglikelihood_scores_every_token_after_the_prefix(lm):
    text = "Kalo Mire Tosu"
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    tokens = [lm.prefix_token_id, *lm.tok_encode(text, add_special_tokens=False)]
    logits = np.asarray(lm.model(jnp.asarray([tokens[:-1]])))[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert rolled == pytest.approx(sum(logp[i, tokens[i + 1]] for i in range(len(tokens) - 1)), rel=1e-4)
