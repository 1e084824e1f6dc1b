"""Paper experiment (a negative result to reproduce): zero-shot CoT on GSM8K, majority vote over 10 samples.
CoT helps System 2 but does not distil. 8B instruct model, bfloat16 compute, LoRA rank 16, FSDP over a v5e-8 host
or one 80 GB GPU.
Set MODEL or pass --config.model.path=... Pool: GSM8K train (labels unused); held-out: GSM8K test, maj@1/5/10."""

from ml_collections import ConfigDict

MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # a hub id (gated: set HF_TOKEN), an HF directory or a .gguf


def get_config():
    return ConfigDict({
        "model": {"path": MODEL, "dtype": "float32", "compute_dtype": "bfloat16", "scan_layers": True},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "task": {"name": "gsm8k", "path": "data:gsm8k_train"},
        "program": {"name": "cot", "max_new_tokens": 512},
        # vote-aware sampling: stop drawing an input's samples once its 10-sample vote cannot change (exact)
        "generate": {"samples": 10, "temperature": 0.7, "max_batch": 64, "chunk": 128, "adaptive": "decided"},
        "filter": {"name": "majority", "min_share": 0.5},
        "train": {"steps": 500, "batch_size": 32, "max_len": 384, "learning_rate": 1e-4, "warmup_steps": 20,
                  "lora_rank": 16, "lora_alpha": 32.0,
                  "checkpoint_every": 100, "remat": "full"},
        "eval": {"path": "data:gsm8k_test", "samples": 10},
    })
