"""Paper experiment, full fine-tuning (no LoRA): RaR 2-step on last letters, as configs/rar2_last_letters.py, with
every weight trained in float32 masters and bfloat16 compute. Sized by `s2d plan` for a TPU v5p-64 (32 chips x
95 GB): an 8B model's float32 parameters, gradients and AdamW moments (~128 GB) sharded FSDP over 32 chips
(`s2d plan --config configs/rar2_last_letters_full.py`). Set MODEL or pass --config.model.path=..."""

from ml_collections import ConfigDict

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_lora", os.path.join(os.path.dirname(__file__), "rar2_last_letters.py"))
_lora = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lora)
MODEL = _lora.MODEL


def get_config():
    config = ConfigDict(_lora.get_config().to_dict())
    config.train.update(lora_rank=0, learning_rate=1e-5, batch_size=256)
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.plan = ConfigDict({"devices": 32, "device_gb": 95.0})
    return config
