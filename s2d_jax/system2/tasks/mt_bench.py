"""MT-bench human judgments (Zheng et al. 2023) as a pairwise judging task: one example per (question, turn,
model A, model B) with every human vote on it. The conversations are rebuilt from `question.jsonl` and the six
models' `model_answer/*.jsonl`; `path` is the MT-bench directory (or its `human_judgments/human.jsonl`).

System 1 is judged with FastChat's prompts as MT-bench judges GPT-4: `pair-v2` (turn 1) and `pair-v2-multi-turn`
(turn 2), and for the math, reasoning and coding questions `pair-math-v1[-multi-turn]` with GPT-4's reference
answers from `reference_answer/gpt-4.jsonl`. GPT-4's own pairwise verdicts (`human_judgments/gpt4_pair.jsonl`)
are scored the same way as a reference row (`reference`)."""

from __future__ import annotations

import os

from s2d_jax.artifacts import read_jsonl
from s2d_jax.errors import S2DError
from s2d_jax.system2.filters import MIRROR
from s2d_jax.system2.tasks.judge import SWAP_SUFFIX, PairwiseJudge, agreement, pair_example

WINNER = {"model_a": "A", "model_b": "B", "tie": "tie", "tie (inconsistent)": "tie"}
NEED_REFERENCE = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS


class MTBenchJudge(PairwiseJudge):
    name = "mt_bench_judge"

    def load(self, path: str) -> list:
        root = _root(path)
        votes_path = path if os.path.isfile(path) else os.path.join(root, "human_judgments", "human.jsonl")
        local = os.path.join(root, "judge_prompts.jsonl")
        prompts = local if os.path.exists(local) else self.prompts_path
        questions = {q["question_id"]: q for q in
                     read_jsonl(os.path.join(root, "question.jsonl"), ("question_id", "turns", "category"))}
        reference_path = os.path.join(root, "reference_answer", "gpt-4.jsonl")
        references = ({r["question_id"]: r["choices"][0]["turns"] for r in
                       read_jsonl(reference_path, ("question_id", "choices"))} if os.path.exists(reference_path)
                      else {})
        answers: dict[str, dict] = {}
        grouped = _votes(votes_path, questions)
        out = []
        for (qid, turn, model_a, model_b), rows in grouped.items():
            q = questions[qid]
            turns = q["turns"]
            a = self._answers(root, model_a, answers)[qid]
            b = self._answers(root, model_b, answers)[qid]
            ref = references.get(qid) if q["category"] in NEED_REFERENCE else None
            kind = "pair-math-v1" if ref else "pair-v2"
            if turn == 1:
                question, response_a, response_b = turns[0], a[0], b[0]
                fields = {"question": turns[0], "answer_a": a[0], "answer_b": b[0]}
                if ref:
                    fields["ref_answer_1"] = ref[0]
            else:  # BSM's fields: the second answers in the context of the first turn
                question = f"{turns[0]}\n\n[Follow-up question, the one to judge]\n{turns[1]}"
                response_a = f"{a[0]}\n\n[Answer to the follow-up]\n{a[1]}"
                response_b = f"{b[0]}\n\n[Answer to the follow-up]\n{b[1]}"
                kind += "-multi-turn"
                fields = {"question_1": turns[0], "question_2": turns[1], "answer_a_1": a[0], "answer_a_2": a[1],
                          "answer_b_1": b[0], "answer_b_2": b[1]}
                if ref:
                    fields.update(ref_answer_1=ref[0], ref_answer_2=ref[1])
            out.append(pair_example(f"mt_bench:{qid}:{turn}:{model_a}:{model_b}", question, response_a, response_b,
                                    tuple(v for v, _ in rows), prompts=prompts, judge=kind, fields=fields,
                                    judges=tuple(j for _, j in rows), turn=turn, model_a=model_a,
                                    model_b=model_b, category=q["category"]))
        if not out:
            raise S2DError(f"{votes_path}: no judgments")
        self.root = root
        return out

    def reference(self, examples) -> dict | None:
        """GPT-4's pairwise verdicts on these examples (MT-bench's `gpt4_pair.jsonl`), scored like a system."""
        path = os.path.join(getattr(self, "root", ""), "human_judgments", "gpt4_pair.jsonl")
        if not os.path.exists(path):
            return None
        questions = {int(e.id.split(":")[1]) for e in examples}
        gpt4 = {}
        for key, rows in _votes(path, None).items():
            if key[0] in questions:
                gpt4[key] = rows[0][0]
                gpt4[(key[0], key[1], key[3], key[2])] = MIRROR[rows[0][0]]
        firsts = [e for e in examples if not e.id.endswith(SWAP_SUFFIX)]
        verdicts = [gpt4.get((int(e.id.split(":")[1]), e.meta["turn"], e.meta["model_a"], e.meta["model_b"]))
                    for e in firsts]
        if all(v is None for v in verdicts):
            return None
        scored = [(e, v) for e, v in zip(firsts, verdicts) if v is not None]
        row = agreement([e for e, _ in scored], [v for _, v in scored])
        return {"name": "GPT-4 (MT-bench pair judgments)", "n": len(scored), **row}

    @staticmethod
    def _answers(root: str, model: str, cache: dict) -> dict[int, list[str]]:
        if model not in cache:
            path = os.path.join(root, "model_answer", f"{model}.jsonl")
            cache[model] = {r["question_id"]: r["choices"][0]["turns"]
                            for r in read_jsonl(path, ("question_id", "choices"))}
        return cache[model]


def _root(path: str) -> str:
    if os.path.isfile(path):  # .../mt_bench/human_judgments/human.jsonl
        return os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return path


def _votes(path: str, questions: dict | None) -> dict[tuple, list[tuple[str, str]]]:
    """(question_id, turn, model_a, model_b) -> [(verdict, judge), ...] of a judgments file."""
    grouped: dict[tuple, list[tuple[str, str]]] = {}
    for number, row in enumerate(read_jsonl(path, ("model_a", "model_b", "question_id", "turn", "winner")), 1):
        if row["winner"] not in WINNER:
            raise S2DError(f"{path}: line {number}: winner {row['winner']!r} is not one of {', '.join(WINNER)}")
        if questions is not None and row["question_id"] not in questions:
            raise S2DError(f"{path}: line {number}: question_id {row['question_id']} is not in question.jsonl")
        key = (row["question_id"], row["turn"], row["model_a"], row["model_b"])
        grouped.setdefault(key, []).append((WINNER[row["winner"]], str(row.get("judge", ""))))
    return grouped
