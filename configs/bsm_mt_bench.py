"""Paper experiment: Branch-Solve-Merge as an LLM judge, distilled on OASST2 pairs with order-swap consistency,
evaluated on MT-bench human judgments (agreement with and without ties, position inconsistency).
8B instruct model, bfloat16 compute, LoRA rank 16, FSDP over a v5e-8 host or one 80 GB GPU. MODEL is a hub id
(or pass --config.model.path=...); OASST2's messages (`data:oasst2`) and MT-bench (`data:mt_bench`) are fetched by
name (`s2d data list`); any path to the public `2023-11-05_oasst2_ready.messages.jsonl.gz` works as task.path too."""

from ml_collections import ConfigDict

MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # a hub id (gated: set HF_TOKEN), an HF directory or a .gguf
OASST2 = "data:oasst2"


def get_config():
    return ConfigDict({
        "model": {"path": MODEL, "dtype": "float32", "compute_dtype": "bfloat16", "scan_layers": True},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "task": {"name": "oasst2_judge", "path": OASST2, "n": 2000, "lang": "en"},
        "program": {"name": "bsm", "criteria": 5},
        "generate": {"samples": 4, "temperature": 0.7, "max_batch": 32, "chunk": 64},
        "filter": {"name": "order_swap", "min_share": 0.5},
        "train": {"steps": 300, "batch_size": 16, "max_len": 2048, "learning_rate": 1e-4, "warmup_steps": 20,
                  "lora_rank": 16, "lora_alpha": 32.0,
                  "checkpoint_every": 100, "remat": "full"},
        "eval": {"task": "mt_bench_judge", "path": "data:mt_bench"},
    })
