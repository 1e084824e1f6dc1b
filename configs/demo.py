"""The CPU demo (`make demo`): System 2 distillation shown working end to end in minutes on 2 cores.

A toy base model (preset `toy`, ~0.5M parameters, a syllable tokenizer built from the corpus) is first pretrained
on a synthetic corpus in which step-by-step answers to last-letter concatenation are common for lists of 1-6
made-up words but direct answers exist only for 1-2 words. So its System 2 (chain of thought) handles 4-word lists
and its System 1 does not.
The unchanged pipeline then distils it from unlabelled 4-word inputs: CoT rollouts, majority vote, fine-tuning
on System 1 prompt -> voted answer, and evaluation of the three systems on held-out 4-word lists."""

from ml_collections import ConfigDict


def get_config():
    return ConfigDict({
        "seed": 0,
        "model": {"preset": "toy"},
        "tokenizer": "syllables",
        "mesh": {"data": 1},
        "pretrain": {"steps": 600, "corpus_size": 20000, "cot_max_words": 6, "direct_max_words": 2,
                     "direct_share": 0.3, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 30,
                     "max_len": 256, "pack": True},
        # made-up syllable words (the syllable tokenizer's), and System 1 prompted as the toy corpus taught it
        "task": {"name": "last_letters", "n": 1000, "size": 4, "seed": 0, "words": "syllables"},
        "program": {"name": "cot", "max_new_tokens": 64, "system1_format": False},
        "generate": {"samples": 4, "temperature": 0.7, "max_batch": 64, "chunk": 64},
        "filter": {"name": "majority", "min_share": 0.5},
        "train": {"steps": 300, "batch_size": 16, "max_len": 128, "learning_rate": 1e-3, "warmup_steps": 10,
                  "checkpoint_every": 100, "log_every": 10},
        "eval": {"n": 100, "seed": 1, "max_new_tokens": 16},
    })
