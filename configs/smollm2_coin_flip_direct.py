"""Baseline of configs/smollm2_coin_flip.py (the paper's "System 1 self-consistency" distillation): the same run
with the `direct` program, i.e. System 1's own answers sampled N times, majority-voted and distilled. Compare the
two with `s2d report runs/smollm2_coin_flip runs/smollm2_coin_flip_direct`."""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("smollm2_coin_flip.py")))["get_config"]()
    config.program.name = "direct"
    config.program.max_new_tokens = 0  # the task's System 1 answer budget
    return config
