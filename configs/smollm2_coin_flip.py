"""The whole loop on a real pretrained model, on a laptop CPU: SmolLM2-135M-Instruct (its GGUF, fetched by
`make fixtures`), RaR 2-step on 64 generated coin flips (real first names, both public wordings), majority vote,
full fine-tuning, evaluation on 64 of Kojima et al.'s coin flips and on two perturbed copies of them (robustness).
About 30 minutes on 2 cores. At 135M parameters its System 2 is not better than its System 1 on this task, so this
run shows the machinery on real weights, not the effect; `configs/demo.py` shows the effect.
Its baseline, System 1 self-consistency distillation: configs/smollm2_coin_flip_direct.py."""

from ml_collections import ConfigDict

from s2d_jax.assets import SMOLLM2_GGUF


def get_config():
    return ConfigDict({
        "model": {"path": SMOLLM2_GGUF},
        "mesh": {"data": 1},
        "task": {"name": "coin_flip", "n": 64, "size": 4, "seed": 0},
        "program": {"name": "rar2", "max_new_tokens": 128},
        "generate": {"samples": 4, "temperature": 0.7, "max_batch": 32, "chunk": 32},
        "filter": {"name": "majority", "min_share": 0.5},
        "train": {"steps": 40, "batch_size": 8, "max_len": 256, "learning_rate": 1e-5, "warmup_steps": 4,
                  "checkpoint_every": 20, "log_every": 5},
        "eval": {"path": "data:coin_flip", "n": 64,
                 "variants": ("flip_means_reverse", "lowercase_names")},
    })
