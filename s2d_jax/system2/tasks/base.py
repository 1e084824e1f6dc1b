"""What every task provides: examples from files (and from a seed where synthetic), the System 1 prompt, an
answer parser for real model text, and a scorer. Labels are used only to score, never in distillation."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import re
from typing import Any

from s2d_jax.errors import S2DError

ANSWER_PREFIX = "The answer is: "  # how the programs' answer-format instruction asks the final answer to start


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    input: str  # the task input as the user would type it
    label: Any = None  # gold answer (normalised), for evaluation only
    meta: dict = dataclasses.field(default_factory=dict)


class Task:
    name: str = ""
    size_arg: str = "size"  # the generator's keyword for input size (synthetic tasks)
    answer_tokens: int = 32  # System 1's budget: the answer in the asked format, with room to spare
    VARIANTS: dict = {}  # robustness: name -> a perturbation of an input that must not change its answer

    def load(self, path: str) -> list[Example]:
        raise NotImplementedError

    def configure(self, task_config, split: str) -> None:
        """Read what loading needs from the `task` config group (judging tasks: prompts, language, split)."""

    def system1_prompt(self, example: Example, instruction: str = "") -> str:
        """System 1's prompt: the input, then the program's answer-format instruction when given (the paper gives
        System 1 the same instruction as the program's final stage)."""
        return example.input + instruction

    def parse(self, text: str):
        raise NotImplementedError

    def target(self, answer, instruction: str = "") -> str:
        """The distillation target: the final answer alone, as System 1 should say it (in the instruction's
        format when System 1 is given one)."""
        return (ANSWER_PREFIX if instruction else "") + str(answer)

    def score(self, answer, example: Example) -> bool:
        return answer is not None and answer == example.label

    def metrics(self, examples: list[Example], answers: list) -> dict:
        """What the task reports beyond accuracy (per-template accuracy, agreement without ties, ...)."""
        return {}

    def reference(self, examples: list[Example]) -> dict | None:
        """A reference system's scores on these examples where the benchmark ships its verdicts (MT-bench's GPT-4
        judgments), else None."""
        return None

    def swap(self, example: Example) -> Example | None:
        """The same input with a perturbation that must not change the answer (pairwise judging: the two
        responses swapped), for the order-swap filter; None where the task has none."""
        return None

    def from_record(self, record: dict, id: str, input_field: str, label_field: str) -> Example:
        """An example from a generic record (a TFDS dataset row): `input_field` is the input, `label_field`
        (dotted for nested fields, "" for none) the label."""
        return Example(id, str(field(record, input_field)), field(record, label_field) if label_field else None)


def field(record, dotted: str):
    """`record["a"]["b"]` for "a.b"; bytes decoded; numpy arrays of strings become lists."""
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise S2DError(f"record has no field {dotted!r} (fields here: {', '.join(sorted(value)) if isinstance(value, dict) else type(value).__name__})")
        value = value[part]
    if isinstance(value, bytes):
        return value.decode()
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def read_json(path: str):
    """A JSON file, with bad input as one clear error (file and line)."""
    from s2d_jax.artifacts import readable_file

    readable_file(path, "a JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise S2DError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise S2DError(f"{path}: not UTF-8 text (a binary file?)") from None


def question_answer_rows(path: str) -> list[dict]:
    """Rows of `{"examples": [{"question", "answer"}, ...]}` (zero-shot-CoT files) or of a JSON list of such
    objects (Rephrase-and-Respond files, which add `refined_question`)."""
    data = read_json(path)
    rows = data.get("examples") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise S2DError(f"{path}: expected a JSON list or an object with an 'examples' list")
    if not rows:
        raise S2DError(f"{path}: no examples")
    for i, row in enumerate(rows):
        for key in ("question", "answer"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise S2DError(f"{path}: example {i}: missing string field {key!r}")
    return rows


_SYLLABLES = ["ka", "lo", "mi", "re", "to", "na", "su", "vi", "de", "ba", "ri", "zo", "el", "an", "ju", "po",
              "ty", "ch", "sh", "ex", "ol", "ur", "ig", "am", "wen", "dar", "lin", "mar", "kel", "son"]


@functools.cache
def first_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(female, male) first names of the Moby word list (MIT, via dominictarr/random-name; see data/SOURCES.md),
    single words of letters only ("Dee Dee" or "Anne-Marie" would be two words of a last-letters list)."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    return tuple(tuple(name for line in open(os.path.join(here, f"{kind}_first_names.txt"))
                       if (name := line.strip()).isascii() and name.isalpha()) for kind in ("female", "male"))


def real_names(rng: random.Random, count: int) -> list[str]:
    """`count` distinct first names, each from the female or the male list with equal chance."""
    names: list[str] = []
    while len(names) < count:
        name = rng.choice(first_names()[rng.random() < 0.5])
        if name not in names:
            names.append(name)
    return names


def made_up_names(rng: random.Random, count: int, syllables=_SYLLABLES, lengths=(2, 3)) -> list[str]:
    """`count` distinct capitalised made-up names of `lengths` syllables from a seeded generator (any number, no
    name list needed)."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(syllables) for _ in range(rng.randint(min(lengths), max(lengths)))).capitalize()
        if name not in names:
            names.append(name)
    return names


def stated_answer(text: str, marker: str = r"answer\s*(?:is|:)") -> str | None:
    """The span after the last `marker`: a quoted span up to its closing quote, else up to the end of the
    sentence or line (an initial such as "J." does not end it). None when the marker is absent or nothing
    follows it (a model stuck repeating 'The answer is: "The answer is: "' has stated nothing)."""
    parts = re.split(marker, text, flags=re.IGNORECASE)
    if len(parts) < 2:
        return None
    tail = parts[-1].lstrip(" \t:*`")
    if tail and tail[0] in "\"'“":
        close = {"\"": "\"", "'": "'", "“": "”"}[tail[0]]
        end = tail.find(close, 1)
        span = tail[1:end] if end > 0 else tail[1:].split("\n")[0]
    else:
        span = re.split(r"(?<=[.!?])(?<!\b[A-Z]\.)\s|\n", tail)[0].rstrip(".!?*` ")
    return span.strip() or None


def sentences(text: str) -> list[str]:
    """Complete sentences: a last one cut off by the token limit (no final punctuation) is left out."""
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s.strip()]
    if parts and not re.search(r"[.!?\"'*)]$", parts[-1]):
        parts.pop()
    return parts


def last_match(patterns: list[str], text: str, flags=re.IGNORECASE | re.DOTALL) -> str | None:
    """The last match of the first pattern that matches at all (models state answers at the end)."""
    for pattern in patterns:
        found = re.findall(pattern, text, flags)
        if found:
            return found[-1]
    return None
