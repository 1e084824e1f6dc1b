"""Tiny and self-contained: a 2-layer Llama (preset `tiny`) with the built-in byte tokenizer, given a few seconds
of pretraining on the synthetic last-letters corpus so that its answers are answer-shaped, then the whole loop on
a few generated inputs. Every stage runs on CPU in seconds; the tests use it."""

from ml_collections import ConfigDict


def get_config():
    return ConfigDict({
        "seed": 0,
        "model": {"preset": "tiny"},
        "tokenizer": "bytes",
        "mesh": {"data": 1},
        "task": {"name": "last_letters", "n": 6, "size": 2, "words": "syllables"},
        "program": {"name": "cot", "max_new_tokens": 64, "system1_format": False},
        "pretrain": {"steps": 60, "corpus_size": 600, "cot_max_words": 3, "batch_size": 16, "learning_rate": 3e-3,
                     "warmup_steps": 10, "max_len": 256},
        "generate": {"samples": 4, "temperature": 1.0, "chunk": 4},
        "filter": {"min_share": 0.25},
        "train": {"steps": 12, "batch_size": 4, "max_len": 160, "learning_rate": 3e-3, "warmup_steps": 2,
                  "checkpoint_every": 4, "log_every": 2},
        "eval": {"n": 8, "max_new_tokens": 8},
        # no warm-up: it would compile every program the queued prompts could meet, most of which a run this small
        # never calls (26 programs against 14 for a 12-input generate, 15.9 s against 8.9 s on CPU)
        "compile": {"warmup": False},
    })
