"""System 2 programs as data: a list of stages, each a prompt template filled from the example and the outputs
of earlier stages. `run_program` executes any program as a stream of calls to the rollout engine (a sample's next
stage starts when its previous one ends); adding a program touches no runner code.

Template fields: `{input}` (the task input), any key of the example's `meta` (e.g. BSM's `{question}`,
`{response_a}`, `{response_b}`), the program's parameters (BSM's `{criteria}`) and the name of every earlier stage.
A fan-out stage runs once per item of an earlier stage's output (BSM's solve: one call per criterion of the plan),
with the item as `{item}`, and its outputs are joined for later stages. A stage with a `parser` also records what
it parsed (the plan's criteria, the per-criterion scores).
"""

from __future__ import annotations

import dataclasses
import string
import zlib
from collections.abc import Sequence

from s2d_jax.errors import S2DError
from s2d_jax.system2.stage_parsers import PARSERS, plan_items

ANSWER_PREFIX = "The answer is: "
ANSWER_SUFFIX = f" End with '{ANSWER_PREFIX}' followed by your final answer."
PARAMS = {"criteria": 5}  # program parameters a template may use, with their defaults (config: program.criteria)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    template: str
    max_new_tokens: int = 256  # this stage's own budget; 0 = the task's System 1 answer budget
    fan_out: str | None = None  # name of an earlier stage whose items (a plan's criteria) this stage runs over
    parser: str | None = None  # a name in stage_parsers.PARSERS: what the stage's output is parsed into


@dataclasses.dataclass(frozen=True)
class Program:
    name: str
    stages: tuple[Stage, ...]

    @property
    def answer_format(self) -> str:
        """The answer-format instruction the final stage ends with ("" if none): System 1 gets it too."""
        return ANSWER_SUFFIX if self.stages[-1].template.endswith(ANSWER_SUFFIX) else ""

    def fields(self, stage_index: int, meta_keys: Sequence[str] = ()) -> set[str]:
        return {"input", *meta_keys, *PARAMS, *(s.name for s in self.stages[:stage_index])} | (
            {"item"} if self.stages[stage_index].fan_out else set())

    def budgets(self, every: int = 0, per_stage: str = "", answer_tokens: int = 32) -> dict[str, int]:
        """Each stage's token budget: `every` (> 0) sets all of them, `per_stage` ("rephrase=128,answer=512")
        sets named ones over that; a stage whose own budget is 0 takes the task's `answer_tokens`."""
        out = {s.name: every or s.max_new_tokens or answer_tokens for s in self.stages}
        for name, value in parse_stage_tokens(per_stage).items():
            if name not in out:
                raise S2DError(f"config key 'program.stage_tokens': program {self.name!r} has no stage {name!r} "
                               f"(stages: {', '.join(out)})")
            out[name] = value
        return out

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
            if stage.parser and stage.parser not in PARSERS:
                raise S2DError(f"program {self.name!r}, stage {stage.name!r}: unknown parser {stage.parser!r}")


def parse_stage_tokens(text: str) -> dict[str, int]:
    """"rephrase=128,answer=512" -> {"rephrase": 128, "answer": 512}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if not value.strip().isdigit() or int(value) < 1:
            raise S2DError(f"config key 'program.stage_tokens': {part!r} is not STAGE=TOKENS with TOKENS >= 1 "
                           f"(e.g. 'rephrase=128,answer=512')")
        out[name.strip()] = int(value)
    return out


# Branch-Solve-Merge as an LLM judge (Saha et al. 2023, sec. 3): branch into an evaluation plan of described
# criteria, solve = score both responses on one criterion (one call per criterion), merge = combine the per-criterion
# evaluations into the verdict. Written from the paper's description of each module (its exact prompt texts are not
# public); the merge's verdict format is MT-bench's, as the task's parser reads it.
BSM_BRANCH = (
    "We want to evaluate the quality of the responses provided by two AI assistants to the user question displayed "
    "below. Your task is to propose an evaluation plan that can be executed to compare the two responses. The "
    "evaluation plan should consist of a list of up to {criteria} criteria that one should consider, such as "
    "helpfulness, relevance, accuracy, depth, creativity or level of detail. Write one criterion per line, numbered, "
    "as its name, a colon and a short description of how to evaluate it.\n\n[User Question]\n{question}\n\n"
    "[Evaluation Plan]")
BSM_SOLVE = (
    "You are given a user question and the responses provided by two AI assistants. Your task is to evaluate and "
    "score the quality of the responses based on a single evaluation criterion displayed below. Evaluate only on "
    "this criterion and no other. In the first line, write \"Assistant A: \" and a score from 1 to 10 for Assistant "
    "A's response; in the second line, \"Assistant B: \" and a score from 1 to 10 for Assistant B's response; then "
    "briefly explain the scores.\n\n[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n"
    "{response_a}\n[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{response_b}\n"
    "[The End of Assistant B's Answer]\n\n[Evaluation Criterion]\n{item}\n[End of Evaluation Criterion]")
BSM_MERGE = (
    "We want to evaluate the quality of the responses provided by two AI assistants to the user question displayed "
    "below. We have evaluated both responses on several criteria, with a score for each assistant and an "
    "explanation per criterion. Combine these evaluations into a final verdict: weigh the criteria by how much they "
    "matter for this question, and do not let the length of the responses or their order influence your decision. "
    "Output your final verdict by strictly following this format: \"[[A]]\" if assistant A is better, \"[[B]]\" if "
    "assistant B is better, and \"[[C]]\" for a tie.\n\n[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{response_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{response_b}\n[The End of Assistant B's Answer]\n\n"
    "[Evaluations per Criterion]\n{solve}\n[End of Evaluations]")

PROGRAMS = {p.name: p for p in (
    # System 1 with N samples: the baseline of distilling System 1's own majority vote ("System 1 self-consistency")
    Program("direct", (Stage("answer", "{input}" + ANSWER_SUFFIX, 0),)),
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
        Stage("branch", BSM_BRANCH, 256, parser="plan"),
        Stage("solve", BSM_SOLVE, 256, fan_out="branch", parser="scores"),
        Stage("merge", BSM_MERGE, 256))),
)}


def get_program(name: str) -> Program:
    if name not in PROGRAMS:
        raise S2DError(f"unknown program {name!r} (programs: {', '.join(sorted(PROGRAMS))})")
    return PROGRAMS[name]


def stage_truncation(records: list[dict]) -> dict[str, float]:
    """Per stage: the share of its calls that stopped at the token budget (records without the field: none)."""
    hits: dict[str, list[bool]] = {}
    for record in records:
        for stage in record.get("stages", []):
            if "truncated" in stage:
                hits.setdefault(stage["name"], []).append(stage["truncated"])
    return {name: sum(v) / len(v) for name, v in hits.items()}


def _key(*parts) -> int:
    """A stable sampling key for a prompt, from the example id and its place in the chain (not its position in a
    batch), so a resumed run draws exactly what an uninterrupted one would have."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


def _stage_record(stage: Stage, prompt: str, out, **extra) -> dict:
    record = {"name": stage.name, "prompt": prompt, "output": out.text, "num_tokens": out.num_tokens,
              "prompt_tokens": out.prompt_tokens, "truncated": out.finish_reason == "length", **extra}
    if stage.parser:
        record["parsed"] = PARSERS[stage.parser](out.text)
    return record


def run_program(program: Program, examples, sampler, n: int, *, parse, seed: int = 0, chat: bool = True,
                budgets: dict[str, int] | None = None, params: dict | None = None, progress: bool = True,
                first_sample: int = 0, **sampling) -> list[dict]:
    """Rollouts of `program` on `examples`, `n` samples each, as `rollouts.jsonl` records, in (example, sample)
    order. Stage 1 draws the n samples from one shared prefill per example; a sample's next stage is queued the
    moment its previous stage ends (the engine streams them: no barrier between stages), each call keyed by its
    example, sample and stage, so the records are what stage-by-stage calls would give. `budgets` maps a stage to
    its token budget (default: `program.budgets()`); `params` fills the program's parameters; the samples are
    numbered (and keyed) from `first_sample`."""
    from s2d_jax.sampling.sampler import Job

    program.check(sorted({k for e in examples for k in e.meta}))
    budgets = budgets or program.budgets()
    params = {**PARAMS, **(params or {})}
    states = [{**params, "input": e.input, **e.meta} for e in examples for _ in range(n)]
    records = [{"id": e.id, "sample": first_sample + j, "input": e.input, "stages": []} for e in examples
               for j in range(n)]
    parts: dict[int, list] = {}  # record -> a fan-out stage's (item, prompt, output), in item order

    def call(index: int, prompt: str, key: int, tag, **extra) -> Job:
        return Job(prompt, key=key, seed=seed * 1000 + index, max_new_tokens=budgets[program.stages[index].name],
                   tag=(index,) + tag, **extra)

    def start(index: int, r: int) -> list[Job]:
        """Record r's call(s) of stage `index` (none once its chain is complete)."""
        if index == len(program.stages):
            return []
        stage, rec = program.stages[index], records[r]
        if not stage.fan_out:
            return [call(index, stage.template.format(**states[r]), _key(rec["id"], rec["sample"]), (r,))]
        items = plan_items(states[r][stage.fan_out], params["criteria"])
        if not items:
            states[r][stage.name] = ""
            return start(index + 1, r)
        parts[r] = [None] * len(items)
        head = stage.template.split("{item}")[0].format(**states[r])  # the items' calls share it: prefilled once
        return [call(index, stage.template.format(**states[r], item=item), _key(rec["id"], rec["sample"], item),
                     (r, k, item), shared_prefix=len(head)) for k, item in enumerate(items)]

    def on_done(job, outs) -> list[Job]:
        index, r, *fan = job.tag
        stage = program.stages[index]
        if index == 0:  # every sample of example r: one shared prefill, n samples
            follow = []
            for j, out in enumerate(outs):
                follow += finish(stage, r * n + j, job.prompt, out, index)
            return follow
        if not fan:
            return finish(stage, r, job.prompt, outs[0], index)
        k, item = fan
        parts[r][k] = (item, job.prompt, outs[0])
        if any(p is None for p in parts[r]):
            return []
        done = parts.pop(r)
        for item, prompt, out in done:
            records[r]["stages"].append(_stage_record(stage, prompt, out, item=item))
        states[r][stage.name] = "\n\n".join(f"Criterion: {item}\n{out.text.strip()}" for item, _, out in done)
        return start(index + 1, r)

    def finish(stage, r, prompt, out, index) -> list[Job]:
        states[r][stage.name] = out.text
        records[r]["stages"].append(_stage_record(stage, prompt, out))
        return start(index + 1, r)

    first = program.stages[0]
    if first.fan_out:
        raise S2DError(f"program {program.name!r}: its first stage cannot fan out")
    jobs = [call(0, first.template.format(**states[i * n]), _key(e.id), (i,), n=n, first_sample=first_sample)
            for i, e in enumerate(examples)]
    sampler.stream(jobs, on_done, chat=chat, progress=progress, **sampling)
    for rec in records:
        final = rec["stages"][-1]["output"]
        rec["answer"] = parse(final)
        rec["num_tokens"] = sum(s["num_tokens"] for s in rec["stages"])
        rec["prompt_tokens"] = sum(s["prompt_tokens"] for s in rec["stages"])
    return records
