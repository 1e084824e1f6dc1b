"""Tiny and self-contained: a random 2-layer Llama (preset `tiny`) with the built-in byte tokenizer.

Every stage runs on CPU in seconds; tests and the tiny pipeline use it.
"""

from ml_collections import ConfigDict


def get_config():
    return ConfigDict({
        "seed": 0,
        "model": {"preset": "tiny"},
        "tokenizer": "bytes",
        "mesh": {"data": 1},
    })
