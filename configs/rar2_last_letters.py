"""Paper experiment: RaR 2-step on last-letter concatenation, majority vote over 8 samples (Yu et al. 2024, sec. 4).

Sized for one TPU v5e-8 host or one 80 GB GPU with an 8B instruct model in bfloat16 (FSDP over every chip).
Set MODEL (an HF directory with safetensors, or a .gguf) or pass --config.model.path=...; nothing else is needed.
Unlabelled pool: 1,000 generated 4-word lists; held-out: Kojima et al.'s 500 lists in ../shared/data.
"""

from ml_collections import ConfigDict

MODEL = "/models/Llama-3.1-8B-Instruct"


def get_config():
    return ConfigDict({
        "model": {"path": MODEL, "dtype": "bfloat16"},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "task": {"name": "last_letters", "n": 1000, "size": 4, "seed": 0},
        "program": {"name": "rar2"},
        "generate": {"samples": 8, "temperature": 0.7, "max_batch": 64, "chunk": 128},
        "filter": {"name": "majority", "min_share": 0.5},
        "train": {"steps": 300, "batch_size": 32, "max_len": 256, "learning_rate": 1e-5, "warmup_steps": 20,
                  "checkpoint_every": 100, "eval_every": 100, "remat": "full"},
        "eval": {"path": "../shared/data/last_letters/last_letters.json", "n": 500, "max_new_tokens": 32},
    })
