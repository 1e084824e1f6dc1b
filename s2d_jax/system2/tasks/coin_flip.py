"""Coin flip (Kojima et al. 2022; Rephrase-and-Respond): is the coin still heads up after some people flip it?"""

from __future__ import annotations

import os
import random
import re

from s2d_jax.system2.tasks.base import (Example, Task, last_match, made_up_names, question_answer_rows, real_names,
                                        sentences, stated_answer)

NOTE = 'Note that "flip" here means "reverse".'
# The public wordings: Kojima et al. (zero_shot_cot, the held-out set: capitalised names, NOTE) and Wei et al.'s
# chain-of-thought exemplars (lower-case names, "Flip means reverse.").
WORDINGS = {
    "kojima": lambda steps: f"A coin is heads up. {steps} Is the coin still heads up? {NOTE}",
    "wei": lambda steps: f"A coin is heads up. {steps} Is the coin still heads up? Flip means reverse.",
}


class CoinFlip(Task):
    name = "coin_flip"
    size_arg = "num_people"
    answer_tokens = 16
    # robustness (small prompt changes that must not change the answer), applied to held-out questions in
    # Kojima et al.'s wording
    VARIANTS = {
        "no_note": lambda q: q.replace(" " + NOTE, ""),
        "flip_means_reverse": lambda q: q.replace(NOTE, "Flip means reverse."),
        "lowercase_names": lambda q: re.sub(r"(?<=\. )([A-Z][a-z]+)(?= (?:flips|does not flip))",
                                            lambda m: m.group(1).lower(), q),
        "answer_yes_or_no": lambda q: q + " Answer yes or no.",
        "tails_question": lambda q: q.replace("Is the coin still heads up?", "Is the coin heads up now?"),
    }

    def load(self, path: str) -> list[Example]:
        base = os.path.basename(path)
        return [Example(f"{base}:{i}", row["question"], self.parse(row["answer"]))
                for i, row in enumerate(question_answer_rows(path))]

    def generate(self, n: int, seed: int = 0, num_people: int = 4, words: str = "names") -> list[Example]:
        """Seeded flips: real first names and the public wordings in equal shares (words="syllables": made-up
        names, Kojima et al.'s wording)."""
        rng = random.Random(f"coin_flip:{seed}:{num_people}" + ("" if words == "syllables" else f":{words}"))
        out = []
        for i in range(n):
            wording = "kojima" if words == "syllables" else rng.choice(sorted(WORDINGS))
            people = made_up_names(rng, num_people) if words == "syllables" else real_names(rng, num_people)
            if wording == "wei":
                people = [p.lower() for p in people]
            flips = [rng.random() < 0.5 for _ in people]
            steps = " ".join(f"{p} {'flips' if f else 'does not flip'} the coin." for p, f in zip(people, flips))
            out.append(Example(f"coin_flip-s{seed}-p{num_people}:{i}", WORDINGS[wording](steps),
                               "no" if sum(flips) % 2 else "yes", {"flips": sum(flips), "wording": wording}))
        return out

    def parse(self, text: str) -> str | None:
        """'The answer is: **yes**.', 'No, the coin is tails up.', 'The coin is still heads up. Because ...'

        Reasoning restates the premise ("the coin is heads up") and says "no" in passing, so only what follows the
        last "answer is", a leading yes/no, or the last (else first) complete sentence counts; a chain of thought
        cut off before its conclusion gives None.
        """
        span = stated_answer(text)
        if span is not None:
            return self._verdict(span)
        lead = re.match(r"\W*(yes|no)\b", text, re.IGNORECASE)
        if lead:
            return lead.group(1).lower()
        done = sentences(text)
        for sentence in (done[-1:] + done[:1]) if done else []:
            verdict = self._verdict(sentence)
            if verdict:
                return verdict
        return None

    @staticmethod
    def _verdict(sentence: str) -> str | None:
        word = last_match([r"\b(yes|no)\b"], sentence)
        if word:
            return word.lower()
        if re.search(r"\bif\b", sentence, re.IGNORECASE):  # a condition is not a conclusion
            return None
        if re.search(r"heads", sentence, re.IGNORECASE) and re.search(r"tails", sentence, re.IGNORECASE):
            return None  # "either tails up or heads up" names both outcomes
        state = last_match([r"\b(not\s+(?:still\s+)?heads\s+up|tails\s+up|still\s+heads\s+up)\b"], sentence)
        if state:
            return "yes" if state.lower().startswith("still") else "no"
        return None
