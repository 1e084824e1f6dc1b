"""Training data: prompt/target JSONL -> tokenized, loss-masked, shuffled, (packed,) batched rows, through grain.

Each pair becomes the token sequence the sampler would see (the prompt in the chat template, then the target and
the end-of-turn token), shifted into `inputs`/`targets`, with `weights` = 1 on target tokens only: the loss never
sees the prompt or padding. Shifting happens per example, before packing, so a packed row never predicts across
two examples, and `segment_ids` keep attention inside each example.

The grain iterator's state is small (`get_state()`), and the trainer checkpoints it with the parameters: a resumed
run sees exactly the rows it had not yet seen.
"""

from __future__ import annotations

import dataclasses
import logging

import grain
import grain.experimental
import numpy as np

from s2d_jax.artifacts import read_jsonl
from s2d_jax.errors import S2DError
from s2d_jax.tokenizer import chat_prompt

log = logging.getLogger("s2d.data")

FIELDS = ("inputs", "targets", "weights")


def encode(tokenizer, prompt: str, target: str, chat: bool = True) -> dict[str, np.ndarray]:
    """One training example: `inputs`, `targets` (inputs shifted by one) and `weights` (1 on target tokens)."""
    if chat:
        head = chat_prompt(tokenizer, prompt)
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": target}], tokenize=False)
        tail = full[len(head):] if full.startswith(head) else target
        prompt_ids = tokenizer(head, add_special_tokens=False).input_ids
        target_ids = tokenizer(tail, add_special_tokens=False).input_ids
    else:
        prompt_ids = tokenizer(prompt).input_ids
        target_ids = tokenizer(target, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    if eos is not None:  # end at the end-of-turn token the sampler stops on (templates add a newline after it)
        target_ids = target_ids[:target_ids.index(eos) + 1] if eos in target_ids else target_ids + [eos]
    ids = np.asarray(prompt_ids + target_ids, np.int32)
    weights = np.zeros(len(ids), np.float32)
    weights[len(prompt_ids):] = 1.0
    return {"inputs": ids[:-1], "targets": ids[1:], "weights": weights[1:]}


@dataclasses.dataclass
class Encoded:
    examples: list[dict[str, np.ndarray]]
    dropped: int  # pairs longer than max_len
    target_tokens: int


def load_pairs(path: str, tokenizer, *, max_len: int, chat: bool = True, too_long: str = "drop") -> Encoded:
    """Read and encode every `{prompt, target}` line of `path`; pairs over `max_len` tokens are dropped and counted
    (`too_long="drop"`) or an error naming the line (`"error"`)."""
    rows = read_jsonl(path, ("prompt", "target"), strings=("prompt", "target"))
    if not rows:
        raise S2DError(f"{path}: no training pairs (the file is empty)")
    examples, dropped = [], 0
    for number, row in enumerate(rows, 1):
        if not isinstance(row["prompt"], str) or not isinstance(row["target"], str):
            raise S2DError(f"{path}: record {number}: 'prompt' and 'target' must be strings")
        ex = encode(tokenizer, row["prompt"], row["target"], chat)
        if len(ex["inputs"]) > max_len:
            if too_long == "error":
                raise S2DError(f"{path}: record {number}: {len(ex['inputs']) + 1} tokens exceed train.max_len="
                               f"{max_len} (raise it, or set train.too_long='drop')")
            dropped += 1
            continue
        examples.append(ex)
    if not examples:
        raise S2DError(f"{path}: every one of the {len(rows)} pairs is longer than train.max_len={max_len}")
    if dropped:
        log.warning("%s: dropped %d of %d pairs longer than max_len=%d tokens", path, dropped, len(rows), max_len)
    return Encoded(examples, dropped, int(sum(e["weights"].sum() for e in examples)))


def _pad(example: dict[str, np.ndarray], max_len: int) -> dict[str, np.ndarray]:
    n = len(example["inputs"])
    out = {k: np.pad(example[k], (0, max_len - n)) for k in FIELDS}
    out["segment_ids"] = (np.arange(max_len) < n).astype(np.int32)
    out["positions"] = np.where(out["segment_ids"] == 1, np.arange(max_len), 0).astype(np.int32)
    return out


def _from_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**{k: row[k] for k in FIELDS}, "segment_ids": row["inputs_segment_ids"].astype(np.int32),
            "positions": row["inputs_positions"].astype(np.int32)}


def dataset(examples: list[dict[str, np.ndarray]], *, rows: int, max_len: int, seed: int,
            pack: bool = False) -> grain.IterDataset:
    """An endless, deterministically shuffled stream of global batches `[rows, max_len]` (keys: inputs, targets,
    weights, segment_ids, positions). Every host iterates the same stream and keeps the rows of its own devices
    (the trainer slices them), so batches, and the iterator state a checkpoint holds, do not depend on the
    number of hosts: a run resumes exactly on another host count."""
    ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat(None)  # a new permutation every epoch
    if pack:
        packed = grain.experimental.FirstFitPackIterDataset(
            ds.to_iter_dataset(), length_struct={k: max_len for k in FIELDS}, num_packing_bins=rows, seed=seed,
            shuffle_bins=False)
        return packed.map(_from_packed).batch(rows, drop_remainder=True)
    return ds.map(lambda e: _pad(e, max_len)).batch(rows, drop_remainder=True).to_iter_dataset()
