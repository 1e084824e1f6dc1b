"""Baseline of configs/rar2_last_letters.py (Yu et al. 2024): System 1 self-consistency distillation. The same run
with the `direct` program: System 1's own answers (the same prompt and answer format as System 1's evaluation),
sampled 8 times, majority-voted and distilled. The paper finds it already helps on last letters."""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("rar2_last_letters.py")))["get_config"]()
    config.program.name = "direct"
    return config
