"""Paper experiment: RaR 2-step on coin flip, majority vote over 8 samples. Sized for a TPU v5e-8 host or one
80 GB GPU (8B instruct model, bfloat16 compute, LoRA rank 16, FSDP). Set MODEL or pass --config.model.path=...
Unlabelled pool: 1,000 generated 4-person flips (real first names, both public wordings); held-out: Kojima et
al.'s 500 (`data:coin_flip`, fetched by name), and the same under five small prompt changes (robustness, per system).
Baseline: configs/rar2_coin_flip_system1_sc.py."""

from ml_collections import ConfigDict

MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # a hub id (gated: set HF_TOKEN), an HF directory or a .gguf


def get_config():
    return ConfigDict({
        "model": {"path": MODEL, "dtype": "float32", "compute_dtype": "bfloat16", "scan_layers": True},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "task": {"name": "coin_flip", "n": 1000, "size": 4, "seed": 0},
        "program": {"name": "rar2"},
        # vote-aware sampling: stop drawing an input's samples once its 8-sample vote cannot change (exact)
        "generate": {"samples": 8, "temperature": 0.7, "max_batch": 64, "chunk": 128, "adaptive": "decided"},
        "filter": {"name": "majority", "min_share": 0.5},
        "train": {"steps": 300, "batch_size": 32, "max_len": 256, "learning_rate": 1e-4, "warmup_steps": 20,
                  "lora_rank": 16, "lora_alpha": 32.0,
                  "checkpoint_every": 100, "eval_every": 100, "remat": "full"},
        # robustness: the held-out flips again under each small prompt change (CoinFlip.VARIANTS)
        "eval": {"path": "data:coin_flip", "n": 500,
                 "variants": ("no_note", "flip_means_reverse", "lowercase_names", "answer_yes_or_no",
                              "tails_question")},
    })
