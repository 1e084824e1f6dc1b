"""Relegation on CPU (`s2d run --config configs/relegation_toy.py`): three rounds in which System 1 takes over what
it has learnt and System 2 is kept for the rest, in minutes on 2 cores.

The demo's toy base model (pretrained in the run: step-by-step answers for lists of 1-6 made-up words, direct
answers for 1-2, and for 3-6 only guesses, random letters: `pretrain.guess_share`, so that where System 1 cannot
answer, its samples disagree, as an unsure model's do) meets a pool of 1-6-word lists, in turn. Each round takes
the next 300 unlabelled lists: System 1 answers each (greedy), and the lists where its answer's per-token
probability is below 0.99 are escalated to System 2 (chain of thought, 4 samples, majority vote); the kept answers
of every round so far are distilled into the base model, and that model is the next round's System 1. Eval: 120 held-out lists (20 of each
length) per round, with the routed system and its accuracy-against-cost curve. Report:
runs/relegation_toy/report.md and rounds.png."""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("demo.py")))["get_config"]()
    config.pretrain.guess_share = 0.5  # System 1 guesses (random letters) on lists it was not taught directly
    config.task = {"name": "last_letters", "n": 900, "size": 1, "size_max": 6, "seed": 0, "words": "syllables"}
    config.program.max_new_tokens = 96
    config.route = {"method": "logprob", "threshold": 0.99}
    config.loop = {"rounds": 3, "accumulate": True, "init": "base"}
    config.eval = {"n": 120, "seed": 1, "max_new_tokens": 16}
    return config
