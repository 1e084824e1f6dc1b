"""Tiny and self-contained: a random 2-layer Llama (preset `tiny`) with the built-in byte tokenizer, on a few
generated last-letter inputs. Every stage runs on CPU in seconds; tests and the tiny pipeline use it."""

from ml_collections import ConfigDict


def get_config():
    return ConfigDict({
        "seed": 0,
        "model": {"preset": "tiny"},
        "tokenizer": "bytes",
        "mesh": {"data": 1},
        "task": {"name": "last_letters", "n": 6, "size": 3},
        "program": {"name": "rar2", "max_new_tokens": 24},
        "generate": {"samples": 4, "temperature": 1.0, "chunk": 4},
        "filter": {"min_share": 0.25},
        "train": {"steps": 12, "batch_size": 4, "max_len": 160, "learning_rate": 3e-3, "warmup_steps": 2,
                  "checkpoint_every": 4, "log_every": 2},
        "eval": {"n": 8, "max_new_tokens": 8},
    })
