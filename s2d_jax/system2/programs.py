"""System 2 programs as data: a list of stages, each a prompt template filled from the example and the outputs
of earlier stages. `run_program` executes any program with one batched `Sampler.generate` call per stage over all
(example, sample) pairs; adding a program touches no runner code.

Template fields: `{input}` (the task input), any key of the example's `meta` (e.g. BSM's `{question}`,
`{response_a}`, `{response_b}`), and the name of every earlier stage. A fan-out stage runs once per line of an
earlier stage's output (BSM's solve: one call per criterion), with the line as `{item}`, and its outputs are
joined for later stages.
"""

from __future__ import annotations

import dataclasses
import string
import zlib
from collections.abc import Sequence

from s2d_jax.errors import S2DError

ANSWER_SUFFIX = " End with 'The answer is: ' followed by your final answer."


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    template: str
    max_new_tokens: int = 256
    fan_out: str | None = None  # name of an earlier stage whose lines this stage runs over
    max_items: int = 3


@dataclasses.dataclass(frozen=True)
class Program:
    name: str
    stages: tuple[Stage, ...]

    def fields(self, stage_index: int, meta_keys: Sequence[str] = ()) -> set[str]:
        return {"input", *meta_keys, *(s.name for s in self.stages[:stage_index])} | (
            {"item"} if self.stages[stage_index].fan_out else set())

    def check(self, meta_keys: Sequence[str] = ()) -> None:
        """Every template field must be defined before its stage runs."""
        for i, stage in enumerate(self.stages):
            known = self.fields(i, meta_keys)
            for _, field, _, _ in string.Formatter().parse(stage.template):
                if field is not None and field not in known:
                    raise S2DError(f"program {self.name!r}, stage {stage.name!r}: template field {{{field}}} is not "
                                   f"defined (defined here: {', '.join(sorted(known))})")
            if stage.fan_out and stage.fan_out not in {s.name for s in self.stages[:i]}:
                raise S2DError(f"program {self.name!r}, stage {stage.name!r}: fan_out {stage.fan_out!r} is not an "
                               f"earlier stage")


PROGRAMS = {p.name: p for p in (
    Program("cot", (Stage("answer", "{input}\nLet's think step by step." + ANSWER_SUFFIX),)),
    Program("rar1", (Stage("answer", "{input}\nRephrase and expand the question, and respond." + ANSWER_SUFFIX),)),
    Program("rar2", (
        Stage("rephrase", "{input}\nGiven the above question, rephrase and expand it to help you do better "
                          "answering. Maintain all information in the original question.", 128),
        Stage("answer", "(original) {input}\n(rephrased) {rephrase}\nUse your answer for the rephrased question "
                        "to answer the original question." + ANSWER_SUFFIX))),
    Program("s2a", (
        Stage("rewrite", "Given the following text by a user, extract the part that is unbiased and not their "
                         "opinion, so that using that text alone would be good context for providing an unbiased "
                         "answer to the question portion of the text. Include the actual question or query that "
                         "the user is asking. Separate this into two categories labeled with \"Unbiased text "
                         "context (includes all content except user's bias):\" and \"Question/Query (does not "
                         "include user bias/preference):\".\n\nText by User: {input}", 192),
        Stage("answer", "{rewrite}\n\nAnswer the question above." + ANSWER_SUFFIX))),
    Program("bsm", (
        Stage("branch", "We want to evaluate the quality of two responses to a user question. List up to three "
                        "criteria for judging them, one per line, without explanations.\n\nQuestion: {question}",
              96),
        Stage("solve", "Evaluate two responses to a user question on one criterion: {item}\n\nQuestion: "
                       "{question}\n\n[Response A]\n{response_a}\n\n[Response B]\n{response_b}\n\nCompare them on "
                       "this criterion only, briefly.", 192, fan_out="branch"),
        Stage("merge", "Question: {question}\n\n[Response A]\n{response_a}\n\n[Response B]\n{response_b}\n\n"
                       "Evaluations by criterion:\n{solve}\n\nCombine the evaluations into a final verdict: output "
                       "\"[[A]]\" if A is better, \"[[B]]\" if B is better, \"[[C]]\" for a tie.", 128))),
)}


def get_program(name: str) -> Program:
    if name not in PROGRAMS:
        raise S2DError(f"unknown program {name!r} (programs: {', '.join(sorted(PROGRAMS))})")
    return PROGRAMS[name]


def _items(text: str, limit: int) -> list[str]:
    lines = [line.strip().lstrip("-*0123456789.) ").strip() for line in text.splitlines()]
    return [line for line in lines if line][:limit] or [text.strip() or "overall quality"]


def _key(*parts) -> int:
    """A stable sampling key for a prompt, from the example id and its place in the chain (not its position in a
    batch), so a resumed run draws exactly what an uninterrupted one would have."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


def run_program(program: Program, examples, sampler, n: int, *, parse, seed: int = 0, chat: bool = True,
                max_new_tokens: int | None = None, progress: bool = True, **sampling) -> list[dict]:
    """Rollouts of `program` on `examples`, `n` samples each, as `rollouts.jsonl` records, in (example, sample)
    order. Stage 1 draws the n samples from one shared prefill per example; each later stage is one batched
    call over all (example, sample[, item]) prompts, continuing each sample's own chain."""
    program.check(sorted({k for e in examples for k in e.meta}))
    states = [{"input": e.input, **e.meta} for e in examples for _ in range(n)]
    records = [{"id": e.id, "sample": j, "input": e.input, "stages": []} for e in examples for j in range(n)]
    for index, stage in enumerate(program.stages):
        stage_seed = seed * 1000 + index
        if max_new_tokens:  # a cap on every stage's budget (tiny configs, quick looks)
            stage = dataclasses.replace(stage, max_new_tokens=min(stage.max_new_tokens, max_new_tokens))
        if stage.fan_out:
            jobs = [(r, item) for r, st in enumerate(states) for item in _items(st[stage.fan_out], stage.max_items)]
            prompts = [stage.template.format(**states[r], item=item) for r, item in jobs]
            keys = [_key(records[r]["id"], records[r]["sample"], item) for r, item in jobs]
            outs = sampler.generate(prompts, n=1, max_new_tokens=stage.max_new_tokens, seed=stage_seed, chat=chat,
                                    progress=progress, prompt_keys=keys, **sampling)
            joined: dict[int, list[str]] = {}
            for (r, item), (out,), prompt in zip(jobs, outs, prompts):
                joined.setdefault(r, []).append(f"{item}: {out.text.strip()}")
                records[r]["stages"].append({"name": stage.name, "prompt": prompt, "output": out.text,
                                             "num_tokens": out.num_tokens, "item": item})
            for r, st in enumerate(states):
                st[stage.name] = "\n".join(joined.get(r, []))
            continue
        if index == 0:  # every sample of an example has the same first prompt: one prefill, n samples
            prompts = [stage.template.format(**states[i * n]) for i in range(len(examples))]
            outs = sampler.generate(prompts, n=n, max_new_tokens=stage.max_new_tokens, seed=stage_seed, chat=chat,
                                    progress=progress, prompt_keys=[_key(e.id) for e in examples], **sampling)
            flat = [(prompts[i], outs[i][j]) for i in range(len(examples)) for j in range(n)]
        else:
            prompts = [stage.template.format(**st) for st in states]
            keys = [_key(r["id"], r["sample"]) for r in records]
            outs = sampler.generate(prompts, n=1, max_new_tokens=stage.max_new_tokens, seed=stage_seed, chat=chat,
                                    progress=progress, prompt_keys=keys, **sampling)
            flat = [(p, o[0]) for p, o in zip(prompts, outs)]
        for st, rec, (prompt, out) in zip(states, records, flat):
            st[stage.name] = out.text
            rec["stages"].append({"name": stage.name, "prompt": prompt, "output": out.text,
                                  "num_tokens": out.num_tokens})
    for rec in records:
        final = rec["stages"][-1]["output"]
        rec["answer"] = parse(final)
        rec["num_tokens"] = sum(s["num_tokens"] for s in rec["stages"])
    return records
