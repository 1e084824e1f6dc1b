"""OASST2 pairwise judging: two ranked sibling assistant replies to the same prompter message, the better-ranked
one preferred. Reads the public flat message format (`2023-11-05_oasst2_ready.messages.jsonl[.gz]`: `message_id`,
`parent_id`, `role`, `text`, `rank`, ...) by path; no copy ships with the project."""

from __future__ import annotations

import gzip
import json
import os
import zlib

from s2d_jax.errors import S2DError
from s2d_jax.system2.tasks.judge import PairwiseJudge, pair_example

FIELDS = ("message_id", "parent_id", "role", "text")


def _messages(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise S2DError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rt") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise S2DError(f"{path}: line {number}: not valid JSON ({e.msg})") from None
            missing = [k for k in FIELDS if k not in row]
            if missing:
                raise S2DError(f"{path}: line {number}: missing field {missing[0]!r}")
            rows.append(row)
    return rows


class OASST2Judge(PairwiseJudge):
    name = "oasst2_judge"

    def load(self, path: str) -> list:
        rows = _messages(path)
        by_id = {r["message_id"]: r for r in rows}
        replies: dict[str, list[dict]] = {}
        for r in rows:
            if r["role"] == "assistant" and r.get("rank") is not None and r["parent_id"] in by_id:
                replies.setdefault(r["parent_id"], []).append(r)
        out = []
        for parent_id, siblings in replies.items():
            if by_id[parent_id]["role"] != "prompter" or len(siblings) < 2:
                continue
            best, second = sorted(siblings, key=lambda r: r["rank"])[:2]
            if best["rank"] == second["rank"]:
                continue
            # the better reply goes first or second by a hash of the prompt: labels are balanced, and stable
            first_is_best = zlib.crc32(parent_id.encode()) % 2 == 0
            a, b = (best, second) if first_is_best else (second, best)
            out.append(pair_example(f"oasst2:{parent_id}", by_id[parent_id]["text"], a["text"], b["text"],
                                    ("A" if first_is_best else "B",), lang=by_id[parent_id].get("lang", "")))
        if not out:
            raise S2DError(f"{path}: no prompter message has two ranked assistant replies")
        return out
