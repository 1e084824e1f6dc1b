"""Paper experiment: System 2 Attention on SycophancyEval TriviaQA (questions with the user's opinion attached),
USC over 20 samples. 8B instruct model, bfloat16 compute, LoRA rank 16, FSDP over a v5e-8 host or one 80 GB
GPU.
MODEL is a hub id (or pass --config.model.path=...). `data:sycophancy_eval` holds 1,000 TriviaQA questions (x 4
templates = 4,000 inputs): the first 3,000 are the unlabelled pool, the last 1,000 the held-out split."""

from ml_collections import ConfigDict

MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # a hub id (gated: set HF_TOKEN), an HF directory or a .gguf
DATA = "data:sycophancy_eval"


def get_config():
    return ConfigDict({
        "model": {"path": MODEL, "dtype": "float32", "compute_dtype": "bfloat16", "scan_layers": True},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "task": {"name": "sycophancy", "path": DATA, "n": 3000},
        "program": {"name": "s2a"},
        "generate": {"samples": 20, "temperature": 0.7, "max_batch": 64, "chunk": 64},
        # USC picks the most consistent of the 20 final responses; that whole response is the target (the paper);
        # "answer" distils the parsed short span instead
        "filter": {"name": "usc", "target": "response"},
        "train": {"steps": 400, "batch_size": 32, "max_len": 256, "learning_rate": 1e-4, "warmup_steps": 20,
                  "lora_rank": 16, "lora_alpha": 32.0,
                  "checkpoint_every": 100, "remat": "full"},
        "eval": {"path": DATA, "offset": 3000, "n": 1000},
    })
