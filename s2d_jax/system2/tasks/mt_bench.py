"""MT-bench human judgments (Zheng et al. 2023) as a pairwise judging task: one example per (question, turn,
model A, model B) with every human vote on it. The conversations are rebuilt from `question.jsonl` and the six
models' `model_answer/*.jsonl`; `path` is the MT-bench directory (or its `human_judgments/human.jsonl`)."""

from __future__ import annotations

import os

from s2d_jax.artifacts import read_jsonl
from s2d_jax.errors import S2DError
from s2d_jax.system2.tasks.judge import PairwiseJudge, pair_example

WINNER = {"model_a": "A", "model_b": "B", "tie": "tie"}


class MTBenchJudge(PairwiseJudge):
    name = "mt_bench_judge"

    def load(self, path: str) -> list:
        root = path
        if os.path.isfile(path):  # .../mt_bench/human_judgments/human.jsonl
            root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        votes_path = path if os.path.isfile(path) else os.path.join(root, "human_judgments", "human.jsonl")
        questions = {q["question_id"]: q["turns"] for q in
                     read_jsonl(os.path.join(root, "question.jsonl"), ("question_id", "turns"))}
        answers: dict[str, dict] = {}
        grouped: dict[tuple, list[str]] = {}
        for number, row in enumerate(read_jsonl(votes_path, ("model_a", "model_b", "question_id", "turn",
                                                             "winner")), 1):
            if row["winner"] not in WINNER:
                raise S2DError(f"{votes_path}: line {number}: winner {row['winner']!r} is not one of "
                               f"{', '.join(WINNER)}")
            if row["question_id"] not in questions:
                raise S2DError(f"{votes_path}: line {number}: question_id {row['question_id']} is not in "
                               f"question.jsonl")
            key = (row["question_id"], row["turn"], row["model_a"], row["model_b"])
            grouped.setdefault(key, []).append(WINNER[row["winner"]])
        out = []
        for (qid, turn, model_a, model_b), votes in grouped.items():
            turns = questions[qid]
            a = self._answers(root, model_a, answers)[qid]
            b = self._answers(root, model_b, answers)[qid]
            if turn == 1:
                question, response_a, response_b = turns[0], a[0], b[0]
            else:  # the whole conversation: judge the second answers in the context of the first turn
                question = f"{turns[0]}\n\n[Follow-up question, the one to judge]\n{turns[1]}"
                response_a = f"{a[0]}\n\n[Answer to the follow-up]\n{a[1]}"
                response_b = f"{b[0]}\n\n[Answer to the follow-up]\n{b[1]}"
            out.append(pair_example(f"mt_bench:{qid}:{turn}:{model_a}:{model_b}", question, response_a, response_b,
                                    tuple(votes), turn=turn, model_a=model_a, model_b=model_b))
        if not out:
            raise S2DError(f"{votes_path}: no judgments")
        return out

    @staticmethod
    def _answers(root: str, model: str, cache: dict) -> dict[int, list[str]]:
        if model not in cache:
            path = os.path.join(root, "model_answer", f"{model}.jsonl")
            cache[model] = {r["question_id"]: r["choices"][0]["turns"]
                            for r in read_jsonl(path, ("question_id", "choices"))}
        return cache[model]
