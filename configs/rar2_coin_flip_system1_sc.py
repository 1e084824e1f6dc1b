"""Baseline of configs/rar2_coin_flip.py: System 1 self-consistency distillation (the `direct` program: System 1's
own answers sampled 8 times, majority-voted and distilled)."""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("rar2_coin_flip.py")))["get_config"]()
    config.program.name = "direct"
    return config
