"""GSM8K (grade-school math): JSONL of {question, answer}, the gold number after `####`. CoT is the paper's
negative result: it helps System 2 but does not distil."""

from __future__ import annotations

import os
import re

from s2d_jax.artifacts import read_jsonl
from s2d_jax.errors import S2DError
from s2d_jax.system2.tasks.base import Example, Task, stated_answer

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"


def normalise_number(text: str | None) -> str | None:
    """'1,234' -> '1234', '$18.00' -> '18', '-3.50' -> '-3.5'; None if there is no number."""
    if text is None:
        return None
    found = re.findall(_NUMBER, text)
    if not found:
        return None
    value = re.sub(r"[\s$,]", "", found[0])
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value if value not in ("", "-") else None


class GSM8K(Task):
    name = "gsm8k"

    def load(self, path: str) -> list[Example]:
        base, out = os.path.basename(path), []
        for number, row in enumerate(read_jsonl(path, ("question", "answer")), 1):
            if not isinstance(row["question"], str) or not isinstance(row["answer"], str):
                raise S2DError(f"{path}: record {number}: 'question' and 'answer' must be strings")
            if "####" not in row["answer"]:
                raise S2DError(f"{path}: line {number}: the answer has no '#### <number>' line")
            out.append(Example(f"{base}:{len(out)}", row["question"], normalise_number(row["answer"].split("####")[-1])))
        if not out:
            raise S2DError(f"{path}: no examples")
        return out

    def parse(self, text: str) -> str | None:
        """'#### 1,234', 'The answer is: $18.', '**18**', else the last number of the text."""
        for marker in (r"####", r"answer\s*(?:is|:)"):
            span = stated_answer(text, marker)
            if span is not None and normalise_number(span) is not None:
                return normalise_number(span)
        bold = re.findall(rf"\*\*[^*]*?({_NUMBER})[^*]*?\*\*", text)
        if bold:
            return normalise_number(bold[-1])
        numbers = re.findall(_NUMBER, text)
        return normalise_number(numbers[-1]) if numbers else None
