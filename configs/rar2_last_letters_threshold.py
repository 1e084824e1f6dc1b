"""Ablation of configs/rar2_last_letters.py: a stricter vote threshold. An input is kept only when at least 75% of
its 8 samples (6) agree (the main config keeps any strict majority of at least 50%)."""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("rar2_last_letters.py")))["get_config"]()
    config.filter.min_share = 0.75
    return config
