"""The one exception users see: a single line naming the file, line or key, and what was expected."""


class S2DError(Exception):
    """Bad input. The CLI prints `s2d: error: <message>` and exits non-zero, with no traceback."""


# what to change when a run does not fit its devices (`s2d plan`, the memory checks, the AOT compile)
REMEDIES = {
    "train": "raise mesh.fsdp (shards parameters and optimizer state), set train.remat=full, lower "
             "train.batch_size or raise train.grad_accum, or train LoRA adapters (train.lora_rank > 0) on a frozen "
             "base",
    "generate": "lower generate.max_batch, use a smaller cache (generate.cache_dtype=bfloat16 or int8), int8 "
                "weights (generate.weights_dtype=int8), or raise generate.mesh.tensor",
}
