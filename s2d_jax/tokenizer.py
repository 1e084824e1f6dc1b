"""Tokenizers: transformers' AutoTokenizer for HF directories, the GGUF's own vocabulary for `.gguf` files, and a
byte-level tokenizer for the tiny self-contained configs. Chat templates are kept in all three."""

from __future__ import annotations

import os

# not AutoTokenizer here: its module loads every model configuration, and with them PyTorch (seconds a process)
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from s2d_jax.errors import S2DError
from s2d_jax.model import hub

BYTES = "bytes"  # the name of the built-in byte tokenizer in configs
SYLLABLES = "syllables"  # a toy tokenizer built by `s2d pretrain` from the task's syllables and corpus

# ChatML, as SmolLM2 and Qwen2 use it; the byte tokenizer's chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_tokenizer(path: str, revision: str = "") -> PreTrainedTokenizerBase:
    """The tokenizer of a model: an HF directory, a `.gguf` file, a hub id (`org/name`, at `revision`), or
    `"bytes"` for the built-in byte tokenizer."""
    path = str(os.fspath(path))
    if path == BYTES:
        return byte_tokenizer()
    path = hub.resolve(path, revision)
    if not os.path.exists(path):
        raise S2DError(f"{path}: no such file or directory (expected a tokenizer directory, a .gguf file, or 'bytes')")
    if path.endswith(".gguf"):
        return _gguf_tokenizer(path)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise S2DError(f"{path}: no tokenizer could be read ({str(e).splitlines()[0]})") from None
    return _with_pad(tok)


def _with_pad(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _gguf_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Build the tokenizer a GGUF file describes with transformers' own GGUF converters, reading the metadata
    with the `gguf` package (transformers' GGUF reader imports torch, which the core install does not have)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    from s2d_jax.model.sources import gguf_reader

    fields = gguf_reader(path).fields
    meta = {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.") or k == "general.architecture"}
    grouped = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tokenizer:
        raise S2DError(f"{path}: the GGUF file has no tokenizer.ggml.tokens (no tokenizer stored)")
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)
    for name, key in {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                      "pad_token": "padding_token_id"}.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer)
    return _with_pad(PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra))


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A 259-token byte-level tokenizer (ids 0-255 are bytes) with ChatML specials: no files, no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=CHATML_TEMPLATE)
    tok.add_special_tokens({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                            "additional_special_tokens": ["<|im_start|>"]})
    return tok


def syllable_tokenizer(syllables, texts, min_share: float = 0.01) -> PreTrainedTokenizerFast:
    """A tokenizer for toy models of made-up words (the CPU demo): a Unigram model over the bytes, every syllable
    (lower case, capitalised, with and without a leading space) and the words found in at least `min_share` of
    `texts` (the template words of the corpus's prompts). Words then take a token per syllable and anything else,
    such as the letters of an answer, a token per letter, so a small model copies a word in two steps, not five."""
    import collections

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces = dict.fromkeys(pre_tokenizers.ByteLevel.alphabet(), -10.0)  # any text stays encodable
    for syllable in syllables:
        for form in (syllable.lower(), syllable.capitalize()):
            pieces[form] = pieces["\u0120" + form] = -1.0  # \u0120 is the byte-level space
    counts = collections.Counter(w for t in texts for w in {w for w, _ in pre.pre_tokenize_str(t)})
    for word, count in counts.items():
        if count >= min_share * len(texts) and len(word) > 1:
            pieces.setdefault(word, -1.0)
    specials = ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]
    backend = Tokenizer(models.Unigram([(s, 0.0) for s in specials] + sorted(pieces.items()), unk_id=0))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=CHATML_TEMPLATE)
    tok.add_special_tokens({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                            "additional_special_tokens": ["<|im_start|>"]})
    return tok


def chat_prompt(tok: PreTrainedTokenizerBase, text: str) -> str:
    """`text` as one user message in the tokenizer's chat template, ready for the assistant's answer."""
    if not tok.chat_template:
        raise S2DError("the tokenizer has no chat template (set chat=False or use an instruct model's tokenizer)")
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
