"""The real SmolLM2-135M-Instruct (GGUF, Q4_1) against transformers' own GGUF loader."""

import jax.numpy as jnp
import numpy as np
import pytest

import s2d_jax
from s2d_jax.tokenizer import chat_prompt
from conftest import torch_logits

QUESTIONS = [
    "What is the capital of France?",
    "Take the last letters of the words in \"Elon Musk Sam Altman\" and concatenate them.",
    "A coin is heads up. Ken flips the coin. Sara does not flip the coin. Is the coin still heads up?",
]


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    import os

    import torch
    import transformers

    d, f = os.path.split(smollm2_gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model, tok


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return s2d_jax.load_model(smollm2_gguf), s2d_jax.load_tokenizer(smollm2_gguf)


def test_config_read_from_gguf(ours):
    cfg = ours[0].cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.num_params == 134_515_008


def test_tokenizer_and_chat_template_match_transformers(ours, reference):
    tok, ref = ours[1], reference[1]
    assert tok.chat_template == ref.chat_template and tok.eos_token == ref.eos_token == "<|im_end|>"
    for q in QUESTIONS + ["café 1,234 — \"quoted\"\n\tend"]:
        text = chat_prompt(tok, q)
        assert text == ref.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                               add_generation_prompt=True)
        assert tok(text).input_ids == ref(text).input_ids


def test_logits_match_transformers_on_chat_prompts(ours, reference):
    model, tok = ours
    for q in QUESTIONS:
        ids = np.asarray(tok(chat_prompt(tok, q)).input_ids)[None]
        a, b = np.asarray(model(jnp.asarray(ids, jnp.int32))), torch_logits(reference[0], ids)
        assert np.abs(a - b).max() <= 1e-3
        assert (a.argmax(-1) == b.argmax(-1)).all()


def test_convert_gguf_to_hf_dir_that_transformers_loads(ours, smollm2_gguf, tmp_path):
    import transformers

    from s2d_jax.cli import main

    assert main(["convert", "--config", "configs/tiny.py", "--workdir", str(tmp_path),
                 f"--config.model.path={smollm2_gguf}", "--config.tokenizer="]) == 0
    out = str(tmp_path / "converted")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = chat_prompt(ours[1], QUESTIONS[0])
    assert ref_tok(text).input_ids == ours[1](text).input_ids
    ids = np.asarray(ours[1](text).input_ids)[None]
    assert np.abs(torch_logits(ref, ids) - np.asarray(ours[0](jnp.asarray(ids, jnp.int32)))).max() <= 1e-3


def test_greedy_matches_transformers_with_chat_template(ours, reference):
    import torch

    from s2d_jax.sampling import Sampler

    model, tok = ours
    questions = ["What is 2+2?", "Hi", "Name three colors of the rainbow and say why the sky is blue, briefly.",
                 "Take the last letters of each word in 'Elon Musk Sam Altman' and concatenate them."]
    out = Sampler(model, tok).generate(questions, max_new_tokens=48, chat=True, progress=False)
    lengths = set()
    for q, (sample,) in zip(questions, out):
        ids = tok(chat_prompt(tok, q), add_special_tokens=False).input_ids
        lengths.add(len(ids))
        with torch.no_grad():
            expected = reference[0].generate(torch.tensor([ids]), max_new_tokens=48,
                                             do_sample=False)[0, len(ids):].tolist()
        assert sample.token_ids == expected
        assert sample.text == tok.decode(expected, skip_special_tokens=True)
    assert len(lengths) == 4 and any(s.finish_reason == "length" and s.num_tokens == 48 for (s,) in out)
