"""Training examples against what users compare them with, on SmolLM2's real tokenizer and chat template: the prompt
the sampler generates from is the start of the training example, token for token; the end-of-turn token is in the
loss and nothing of the prompt is; and completion-only loss, padded or packed, gives TRL's SFT per-token losses on
the same chat examples and weights (TRL's SFTTrainer tokenising and its collator labelling; the losses from
transformers' forward pass). One deviation, stated: TRL also trains the newline the template writes after the
end-of-turn token; we stop at the end of turn, where the sampler stops."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import s2d_jax
from s2d_jax.sampling import Job, Sampler
from s2d_jax.tokenizer import chat_prompt, load_tokenizer
from s2d_jax.train import data as data_lib

CHATS = [("What are the last letters of 'kalo mire'?", "The last letters are o and e, so the answer is oe."),
         ("Flip a coin twice; is it heads?", "Let's think.\nTwo flips return it to heads. The answer is yes."),
         ("Bonjour ?", "Oui.")]


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    """SmolLM2's tokenizer (from its GGUF) and a small random Llama over its vocabulary, saved as a checkpoint."""
    import torch
    import transformers

    tok = load_tokenizer(smollm2_gguf)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("smol_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return tok, model, str(path)


def _example_ids(example) -> np.ndarray:
    return np.r_[example["inputs"], example["targets"][-1:]]


def test_the_generation_prompt_starts_the_training_example_and_the_loss_ends_at_the_end_of_turn(smol):
    tok, _, path = smol
    sampler = Sampler(s2d_jax.load_model(path), tok, max_batch=1)
    for prompt, target in CHATS:
        example = data_lib.encode(tok, prompt, target)
        ids, weights = _example_ids(example), np.r_[0.0, example["weights"]]  # weights[i]: loss on token i
        generated_from = sampler._encode([Job(prompt)], chat=True, first_handle=0)[0][0]
        n = len(generated_from)
        assert list(ids[:n]) == generated_from  # the sampler's prompt tokens, the example's first tokens
        assert tok.decode(ids[:n]) == chat_prompt(tok, prompt)  # byte for byte the chat template's prompt
        assert not weights[:n].any() and weights[n:].all()  # no prompt token in the loss, every answer token
        assert ids[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")  # ends on the end of turn
        assert tok.decode(ids[n:]) == target + "<|im_end|>"


def _trl_losses(path, tmp_path) -> list[np.ndarray]:
    """Per-token losses of each chat example's labelled tokens, as TRL's SFT trainer builds and labels them
    (`tests/trl_reference.py`, in a process of its own)."""
    (tmp_path / "chats.json").write_text(json.dumps(CHATS))
    subprocess.run([sys.executable, str(pathlib.Path(__file__).with_name("trl_reference.py")), path,
                    str(tmp_path / "chats.json"), str(tmp_path / "trl.json")], check=True,
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    rows = json.loads((tmp_path / "trl.json").read_text())
    for row, (_, target) in zip(rows, CHATS):
        assert row["labelled"] == target + "<|im_end|>\n"  # TRL also trains the final newline
    return [np.asarray(row["losses"], np.float32) for row in rows]


def _our_losses(model, rows: dict) -> np.ndarray:
    """`[rows, len]` per-token losses of our batch (0 where the weight is 0), float32."""
    import jax
    import jax.numpy as jnp

    logits = model(jnp.asarray(rows["inputs"]), jnp.asarray(rows["positions"]),
                   segment_ids=jnp.asarray(rows["segment_ids"]))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(rows["targets"])[..., None], -1)[..., 0]
    return np.asarray(nll) * rows["weights"]


@pytest.mark.parametrize("pack", [False, True])
def test_completion_only_losses_equal_trls_padded_or_packed(smol, tmp_path, pack):
    tok, _, path = smol
    want = _trl_losses(path, tmp_path)
    model = s2d_jax.load_model(path)
    examples = [data_lib.encode(tok, p, t) for p, t in CHATS]
    rows = 1 if pack else len(examples)  # packed: all three in one row
    batch = next(iter(data_lib.dataset(examples, rows=rows, max_len=256, seed=0, pack=pack)))
    losses = _our_losses(model, batch)
    got = {}
    for r in range(rows):  # each example's tokens, found by its segment in the row
        for seg in set(batch["segment_ids"][r]) - {0}:
            at = (batch["segment_ids"][r] == seg) & (batch["weights"][r] > 0)
            key = json.dumps(batch["targets"][r][at].tolist())
            got[key] = losses[r][at]
    assert len(got) == len(examples)
    for example, reference in zip(examples, want):
        ours = got[json.dumps(example["targets"][example["weights"] > 0].tolist())]
        # TRL's last labelled token is the newline after the end of turn (the deviation above)
        np.testing.assert_allclose(ours, reference[:-1], rtol=0, atol=2e-5)
