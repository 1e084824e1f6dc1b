"""Ablation of configs/rar2_last_letters.py: no self-consistency filter. Every input whose first System 2 sample
gave an answer is distilled on that answer (`filter.name=none`); the paper finds distillation worse without the
filter. The vote threshold is the other knob: `--config.filter.min_share=0.75` (or 0.5, 1.0) on the main config."""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("rar2_last_letters.py")))["get_config"]()
    config.filter.name = "none"
    config.generate.adaptive = "off"  # no vote to stop on: every sample is drawn
    return config
