"""Last-letter concatenation (Kojima et al. 2022; Rephrase-and-Respond). Synthetic: any size, any list length."""

from __future__ import annotations

import os
import random
import re

from s2d_jax.system2.tasks.base import (Example, Task, last_match, made_up_names, question_answer_rows, real_names,
                                        stated_answer)

QUESTION = 'Take the last letters of each words in "{words}" and concatenate them.'  # Kojima et al.'s wording
# The pools use real first names (words="names"), as the held-out sets do. The toy demo's words (words="syllables")
# are made-up two-syllable names of consonant-vowel syllables ("Kalo Mire Tosu"): every word ends in a vowel, so
# no answer (a run of vowels) contains a syllable, and a syllable tokenizer (the toy's) cuts words into syllables
# and answers into letters.
SYLLABLES = tuple(c + v for c in "klmnrstv" for v in "aeiou")
_WORD = r"([A-Za-z]+)"


def normalise(text: str | None) -> str | None:
    if text is None:
        return None
    letters = re.sub(r"[^a-z]", "", text.lower())
    return letters or None


class LastLetters(Task):
    name = "last_letters"
    size_arg = "num_words"
    syllables = SYLLABLES
    answer_tokens = 24

    def load(self, path: str) -> list[Example]:
        base = os.path.basename(path)
        out = []
        for i, row in enumerate(question_answer_rows(path)):
            m = re.search(r'"([^"]+)"', row["question"])
            words = m.group(1).split() if m else []
            out.append(Example(f"{base}:{i}", row["question"], normalise(row["answer"]), {"words": words}))
        return out

    def generate(self, n: int, seed: int = 0, num_words: int = 4, words: str = "names") -> list[Example]:
        kind = words
        rng = random.Random(f"last_letters:{seed}:{num_words}" + ("" if kind == "syllables" else f":{kind}"))
        out = []
        for i in range(n):
            words = made_up_names(rng, num_words, SYLLABLES, (2,)) if kind == "syllables" else real_names(
                rng, num_words)
            out.append(Example(f"last_letters-s{seed}-w{num_words}:{i}", QUESTION.format(words=" ".join(words)),
                               "".join(w[-1] for w in words).lower(), {"words": words}))
        return out

    def parse(self, text: str) -> str | None:
        """'The answer is: **yajo**.', 'So the concatenation is "yajo".', a bare 'yajo', trailing explanations.
        A restatement of the input words is not an answer (None)."""
        for marker in (r"answer\s*(?:is|:)", r"concatenat\w*\s+(?:of\s+[^.\n]*?\s+)?(?:is|gives|yields|=)"):
            span = stated_answer(text, marker)
            if span is not None:
                return normalise(span)
        found = last_match([rf"\*\*\s*\"?{_WORD}\"?\s*\*\*"], text)
        if found is None:
            words = re.findall(r"[A-Za-z]+", text)
            found = words[0] if len(words) == 1 else None
        return normalise(found)

    def corpus(self, n: int, seed: int, step_prompt: str, cot_max_words: int = 6, direct_max_words: int = 2,
               direct_share: float = 0.3, guess_share: float = 0.0) -> list[dict]:
        """A synthetic instruction corpus for a toy base model (the CPU demo): step-by-step answers to
        `step_prompt` (a System 2 template with `{input}`) for lists of 1..cot_max_words words, and direct answers
        (System 1 prompt -> the letters) only for lists of 1..direct_max_words. Its System 2 then beats its System 1
        on longer lists, which is what distillation can close. `guess_share` of the direct answers are guesses for
        longer lists (letters drawn at random): System 1 then guesses where it cannot answer, so its samples
        disagree there, as a model unsure of an answer does (the relegation toy's router reads that)."""
        rng = random.Random(f"last_letters-corpus:{seed}")
        rows = []
        for _ in range(n):
            direct = rng.random() < direct_share
            guess = direct and guess_share > 0 and direct_max_words < cot_max_words and rng.random() < guess_share
            count = rng.randint(direct_max_words + 1, cot_max_words) if guess else rng.randint(
                1, direct_max_words if direct else cot_max_words)
            words = made_up_names(rng, count, SYLLABLES, (2,))
            question = QUESTION.format(words=" ".join(words))
            if guess:
                rows.append({"prompt": question, "target": "".join(rng.choice("aeiou") for _ in words)})
            elif direct:
                rows.append({"prompt": question, "target": "".join(w[-1] for w in words).lower()})
            else:
                rows.append({"prompt": step_prompt.format(input=question), "target": self.trace(words)})
        return rows

    @staticmethod
    def trace(words: list[str]) -> str:
        """The step-by-step answer, written so that each step is a copy a small transformer learns early: every
        word copied from the question, then ':' and the letters so far, which end with that word's last letter
        ("Kalo:o Mire:oe Tosu:oeu"). The letter before each space is the one before the next word in the question,
        so the next word is found by matching it (an induction head)."""
        parts, letters = [], ""
        for w in words:
            letters += w[-1].lower()
            parts.append(f"{w}:{letters}")
        return " ".join(parts) + f"\nThe answer is: {letters}."
