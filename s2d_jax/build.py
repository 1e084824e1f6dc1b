"""What every stage starts with: the mesh, the model and the tokenizer a config names."""

from __future__ import annotations

import logging
import os

from ml_collections import ConfigDict

from s2d_jax import mesh as mesh_lib
from s2d_jax.relegation import rounds
from s2d_jax.config import teacher_config  # noqa: F401 (build.teacher_config, as before)
from s2d_jax.errors import S2DError
from s2d_jax.model import PRESETS, init_model, load_model, quant
from s2d_jax.tokenizer import SYLLABLES, load_tokenizer

log = logging.getLogger("s2d")


def build_mesh(config: ConfigDict):
    """The configured mesh, or None for a single device (no sharding annotations at all)."""
    m = config.mesh
    mesh = mesh_lib.make_mesh(m.data, m.fsdp, m.tensor, devices=mesh_lib.mesh_devices(config))
    return None if mesh.size == 1 else mesh


def build_generation_mesh(config: ConfigDict):
    """The mesh the sampler decodes on (`generate.mesh`; None for a single device), checked before any weights
    load. Unset, it is chosen for decoding on this platform; on CPU it is the training mesh."""
    import jax

    from s2d_jax.plan import estimate as plan_lib
    from s2d_jax.runtime.distributed import device_bytes

    devices = mesh_lib.generation_devices(config)
    sizes = plan_lib.generation_shape(config, len(devices), jax.local_device_count(), jax.default_backend(),
                                      device_bytes()).shape
    mesh = mesh_lib.make_mesh(**sizes, devices=devices)
    if mesh.size > 1:
        log.info("generation mesh %s", sizes)
    return None if mesh.size == 1 else mesh


def toy_base(config: ConfigDict, workdir: str | None) -> str | None:
    """WORKDIR/base when the run pretrains its own toy base model (`pretrain.steps` > 0 and no `model.path`); a
    round's directory finds it in its workdir."""
    if config.pretrain.steps > 0 and not config.model.path:
        return os.path.join(rounds.root(workdir) or ".", "base")
    return None


def build_model(config: ConfigDict, mesh=None, workdir: str | None = None, base: bool = True, tokenizer=None,
                trainable: bool = False, path: str | None = None, sampling: bool = False):
    """The model the config names (or at `path`): the checkpoint at `model.path`; else, with `pretrain.steps`,
    the toy base model `s2d pretrain` wrote to WORKDIR/base; else a random `model.preset` seeded by `seed` (also
    what pretraining starts from: `base=False`, sized to `tokenizer`'s vocabulary and end-of-turn token when
    given). Its weights are in `model.dtype` only when they are trained in full (`trainable` without LoRA);
    sampling, eval and LoRA's frozen base hold them in the compute dtype; for `sampling`, the projections in
    `generate.weights_dtype`."""
    model = _build_model(config, mesh, workdir, base, tokenizer, trainable, path)
    return quant.quantize(model, config.generate.weights_dtype) if sampling else model


def _build_model(config, mesh, workdir, base, tokenizer, trainable, path):
    m = config.model
    compute = m.compute_dtype or m.dtype
    dtype = m.dtype if trainable and not config.train.lora_rank else compute
    path = path or m.path or (toy_base(config, workdir) if base else None)
    if path and not m.path and not os.path.exists(path):
        raise S2DError(f"{path}: no pretrained base model (config key 'pretrain.steps' > 0: run "
                       f"`s2d pretrain` or `s2d run` first)")
    if path:
        model = load_model(path, dtype=dtype, compute_dtype=compute, mesh=mesh, scan_layers=m.scan_layers,
                           revision=m.revision if path == m.path else "")
        model.cfg = model.cfg.replace(attention=m.attention, splash_block=m.splash_block)
        return model
    if m.preset not in PRESETS:
        raise S2DError(f"config key 'model.preset': {m.preset!r} is not a preset (presets: {', '.join(PRESETS)}); "
                       f"or set 'model.path' to a checkpoint")
    cfg = PRESETS[m.preset].replace(param_dtype=dtype, dtype=compute, scan_layers=m.scan_layers,
                                    attention=m.attention, splash_block=m.splash_block)
    if tokenizer is not None:
        cfg = cfg.replace(vocab_size=max(cfg.vocab_size, -(-len(tokenizer) // 64) * 64),
                          eos_token_ids=(tokenizer.eos_token_id,))
    return init_model(cfg, seed=config.seed, mesh=mesh)


def build_tokenizer(config: ConfigDict, workdir: str | None = None):
    """The tokenizer of `model.path`, or `tokenizer` (a path or `bytes`); in a run that pretrains a toy base
    model, the one pretraining used, saved with it in WORKDIR/base."""
    base = toy_base(config, workdir)
    if base and workdir and os.path.exists(base):
        return load_tokenizer(base)
    if config.tokenizer == SYLLABLES:
        raise S2DError(f"config key 'tokenizer': {SYLLABLES!r} is built by `s2d pretrain` and saved in {base}; "
                       f"run `s2d pretrain` or `s2d run` first")
    path = config.tokenizer or config.model.path
    if not path:
        raise S2DError("config key 'tokenizer': empty, and 'model.path' is empty too (set one, or 'bytes')")
    return load_tokenizer(path, revision=config.model.revision if path == config.model.path else "")


def build_system1(config: ConfigDict, mesh=None, workdir: str | None = None):
    """(model, tokenizer) of the round's System 1: the base model, or in round R > 1 round R-1's distilled one."""
    return (build_model(config, mesh, workdir, path=rounds.system1_path(workdir), sampling=True),
            build_tokenizer(config, workdir))


def build_system2(config: ConfigDict, mesh=None, workdir: str | None = None):
    """(model, tokenizer) that runs the System 2 program: the `teacher` when the config names one, else the base
    model (its own teacher). Its tokenizer may differ from the student's: what passes between them is text."""
    teacher = teacher_config(config)
    if teacher is None:
        return build_model(config, mesh, workdir, sampling=True), build_tokenizer(config, workdir)
    return build_model(teacher, mesh, base=False, sampling=True), build_tokenizer(teacher)
