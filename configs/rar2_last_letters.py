"""Paper experiment: RaR 2-step on last-letter concatenation, majority vote over 8 samples (Yu et al. 2024, sec. 4).

Sized for one TPU v5e-8 host or one 80 GB GPU with an 8B instruct model: LoRA rank 16 on a frozen bfloat16 base,
FSDP over every chip (`s2d plan` checks it; configs/rar2_last_letters_full.py is the full fine-tune for a v5p-64).
MODEL is a hub id; or pass --config.model.path=... (an HF directory with safetensors, a .gguf, or another hub id).
Unlabelled pool: 1,000 generated 4-word lists; held-out: Kojima et al.'s 500 lists (`data:last_letters`, fetched by name).
"""

from ml_collections import ConfigDict

MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # a hub id (gated: set HF_TOKEN), an HF directory or a .gguf


def get_config():
    return ConfigDict({
        "model": {"path": MODEL, "dtype": "float32", "compute_dtype": "bfloat16", "scan_layers": True},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "task": {"name": "last_letters", "n": 1000, "size": 4, "seed": 0},
        "program": {"name": "rar2"},
        # vote-aware sampling: stop drawing an input's samples once its 8-sample vote cannot change (exact)
        "generate": {"samples": 8, "temperature": 0.7, "max_batch": 64, "chunk": 128, "adaptive": "decided"},
        "filter": {"name": "majority", "min_share": 0.5},
        "train": {"steps": 300, "batch_size": 32, "max_len": 256, "learning_rate": 1e-4, "warmup_steps": 20,
                  "lora_rank": 16, "lora_alpha": 32.0,
                  "checkpoint_every": 100, "eval_every": 100, "remat": "full"},
        "eval": {"path": "data:last_letters", "n": 500},
    })
