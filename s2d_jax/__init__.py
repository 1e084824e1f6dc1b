"""s2d_jax: System 2 distillation of language models in JAX.

    model = s2d_jax.load_model(path)          # HF directory, .gguf file, or hub id ("org/name")
    tok = s2d_jax.load_tokenizer(path)
    logits = model(input_ids)                 # int32 [B, T] -> float32 [B, T, vocab]
    s2d_jax.save_hf(model, out_dir)
    mesh = s2d_jax.make_mesh(data=-1, fsdp=1, tensor=1)
"""

import glob as _glob
import importlib.util as _util
import os as _os

# libtpu and the CUDA plugin (installed to compile for TPUs and GPUs ahead of time, `s2d plan`) make JAX probe for
# their chips at start and print their complaints where there are none. Neither chip here (no /dev/accel*, no
# /dev/vfio/N, no /dev/nvidia0): keep JAX on the CPU, as it would end up anyway. Set JAX_PLATFORMS to choose.
if ("JAX_PLATFORMS" not in _os.environ
        and any(_util.find_spec(name) for name in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin"))
        and not _glob.glob("/dev/accel*") and not _glob.glob("/dev/vfio/[0-9]*") and not _os.path.exists("/dev/nvidia0")):
    _os.environ["JAX_PLATFORMS"] = "cpu"

from s2d_jax.errors import S2DError
from s2d_jax.mesh import make_mesh
from s2d_jax.model import ModelConfig, Transformer, init_model, load_model, save_hf
from s2d_jax.sampling import Sample, Sampler
from s2d_jax.tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = ["S2DError", "ModelConfig", "Sample", "Sampler", "Transformer", "init_model", "load_model", "load_tokenizer", "make_mesh",
           "save_hf"]
