"""Tasks and filters: host code only."""

import json
import os
import pathlib

import pytest

from s2d_jax.errors import S2DError
from s2d_jax.system2.filters import FilterReport, majority_vote, order_swap, vote
from s2d_jax.system2.tasks import get_task
from conftest import data

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "golden_parses.jsonl"


# ------------------------------------------------------------------------------------------ filters

def test_majority_vote_counts_invalid_samples_in_the_denominator():
    assert majority_vote(["a", "a", "b", None]) == ("a", 0.5)
    assert majority_vote(["a", "a", "a", "b"], min_share=0.75) == ("a", 0.75)  # inclusive bound
    assert majority_vote(["a", "a", "b", None], min_share=0.75) == (None, 0.5)


def test_ties_no_majority_and_all_invalid():
    assert vote(["a", "b", "a", "b"]).reason == "tie" and vote(["a", "b", "a", "b"]).answer is None
    assert vote([None, None, None]) .reason == "all_invalid"
    assert vote(["a", "a", "b", "c"], min_share=0.6).reason == "below_min_share"
    assert vote(["a", "b", "c"]).reason == "tie"


def test_order_swap_needs_mirrored_verdicts():
    assert order_swap(["A", "A"], ["B", "B"]).answer == "A"  # A wins in both orders
    assert order_swap(["tie"], ["tie"]).answer == "tie"
    d = order_swap(["A", "A"], ["A", "A"])  # position bias: the first slot always wins
    assert d.answer is None and d.reason == "order_inconsistent"
    assert order_swap(["A", "B"], ["B", "B"]).reason == "tie"


def test_filter_report():
    report = FilterReport()
    for answers in (["a", "a"], ["a", "b"], [None, None], ["x", "x", "x", "y"]):
        report.add(vote(answers))
    out = report.to_dict()
    assert (out["total"], out["kept"], out["kept_fraction"]) == (4, 2, 0.5)
    assert out["drops"] == {"all_invalid": 1, "tie": 1}
    assert out["share_histogram"]["0.7-0.8"] == 1 and out["share_histogram"]["0.9-1.0"] == 1


# ------------------------------------------------------------------------------------------ tasks

def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(S2DError, match=r"unknown task 'letters' \(tasks: coin_flip, gsm8k, last_letters, mt_bench_judge, oasst2_judge, sycophancy\)"):
        get_task("letters")


@pytest.mark.parametrize("task, path, count", [
    ("last_letters", "last_letters", 500),
    ("last_letters", "rar_last_letters_gpt4", 219),
    ("last_letters", "rar_last_letters_gpt35", 219),
    ("coin_flip", "coin_flip", 500),
    ("gsm8k", "gsm8k_test", 1319),
    ("gsm8k", "gsm8k_train", 7473),
])
def test_loads_every_public_format(task, path, count):
    examples = get_task(task).load(data(path))
    assert len(examples) == count and len({e.id for e in examples}) == count
    if task == "last_letters":  # the label is the concatenation of the names' last letters; 16 of Kojima's rows
        # hold two-word names ("Jose Antonio"), so check the rows whose word count equals the label's length
        simple = [e for e in examples if len(e.meta["words"]) == len(e.label)]
        assert len(simple) >= 0.95 * count
        assert all(e.label == "".join(w[-1] for w in e.meta["words"]).lower() for e in simple)
    elif task == "coin_flip":
        assert {e.label for e in examples} == {"yes", "no"}
    else:  # every gold answer is a plain number, commas removed
        assert all(e.label is not None and e.label.lstrip("-").replace(".", "").isdigit() for e in examples)
        assert examples[0].label == ("18" if "test" in path else "72")


def test_generators_are_seeded_and_correct():
    ll, cf = get_task("last_letters"), get_task("coin_flip")
    a, b = ll.generate(50, seed=3, num_words=6), ll.generate(50, seed=3, num_words=6)
    assert a == b and a != ll.generate(50, seed=4, num_words=6)
    assert all(len(e.meta["words"]) == 6 and e.label == "".join(w[-1] for w in e.meta["words"]).lower() for e in a)
    flips = cf.generate(200, seed=1, num_people=5)
    assert all(e.label == ("yes" if e.input.count(" flips the coin") % 2 == 0 else "no") for e in flips)
    assert 60 < sum(e.label == "yes" for e in flips) < 140


def test_toy_corpus_has_direct_answers_only_for_short_lists():
    from s2d_jax.system2.programs import get_program

    ll, template = get_task("last_letters"), get_program("cot").stages[0].template
    rows = ll.corpus(400, seed=0, step_prompt=template, cot_max_words=5, direct_max_words=2, direct_share=0.3)
    assert rows == ll.corpus(400, seed=0, step_prompt=template, cot_max_words=5, direct_max_words=2, direct_share=0.3)
    direct = [r for r in rows if not r["prompt"].endswith(template.format(input="")[1:])]
    steps = [r for r in rows if r not in direct]
    assert 80 < len(direct) < 160 and len(steps) == 400 - len(direct)
    for r in rows:
        words = r["prompt"].split('"')[1].split()
        answer = "".join(w[-1] for w in words).lower()
        assert ll.parse(r["target"]) == answer  # every target, direct or step by step, states the right letters
        assert (len(words) <= 2) if r in direct else (1 <= len(words) <= 5)
    assert {len(r["prompt"].split('"')[1].split()) for r in steps} == {1, 2, 3, 4, 5}


def test_syllable_tokenizer_cuts_words_into_syllables_and_answers_into_letters():
    from s2d_jax.system2.programs import get_program
    from s2d_jax.tokenizer import syllable_tokenizer

    ll, template = get_task("last_letters"), get_program("cot").stages[0].template
    rows = ll.corpus(300, seed=0, step_prompt=template)
    tok = syllable_tokenizer(ll.syllables, [r["prompt"] for r in rows])
    pieces = lambda text: [tok.decode([i]) for i in tok(text, add_special_tokens=False).input_ids]
    assert pieces("Kalo:o Mire:oe") == ["Ka", "lo", ":", "o", " Mi", "re", ":", "o", "e"]
    assert pieces("The answer is: oeia.")[-5:] == ["o", "e", "i", "a", "."]
    assert pieces(" concatenate") == [" concatenate"]  # a template word is one token
    text = template.format(input=ll.generate(1, seed=0, num_words=4)[0].input) + " Zürich ☃"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text  # anything stays encodable
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    again = syllable_tokenizer(ll.syllables, [r["prompt"] for r in rows])
    assert again.get_vocab() == tok.get_vocab()  # deterministic: the same corpus gives the same ids


def test_bad_task_files(tmp_path):
    task = get_task("coin_flip")
    (tmp_path / "bad.json").write_text('{"examples": [\n{"question": "q"\n')
    with pytest.raises(S2DError, match=r"bad.json: line 3: not valid JSON"):
        task.load(str(tmp_path / "bad.json"))
    (tmp_path / "missing.json").write_text('[{"question": "q"}]')
    with pytest.raises(S2DError, match=r"missing.json: example 0: missing string field 'answer'"):
        task.load(str(tmp_path / "missing.json"))
    (tmp_path / "g.jsonl").write_text('{"question": "q", "answer": "no number"}\n')
    with pytest.raises(S2DError, match=r"g.jsonl: line 1: the answer has no '#### <number>' line"):
        get_task("gsm8k").load(str(tmp_path / "g.jsonl"))
    (tmp_path / "empty.json").write_text('{"examples": []}')
    with pytest.raises(S2DError, match="empty.json: no examples"):
        task.load(str(tmp_path / "empty.json"))


@pytest.mark.parametrize("task, text, expected", [
    ("coin_flip", "The answer is: **yes**.", "yes"),
    ("coin_flip", "Let's see. No one flips it twice... So the answer is no. Because two flips cancel.", "no"),
    ("coin_flip", "Yes, it is.", "yes"),
    ("last_letters", 'So the concatenation is "yajo".', "yajo"),
    ("last_letters", "The answer is yajo. This is because y, a, j, o are the last letters.", "yajo"),
    ("last_letters", "The answer is: **yajo**", "yajo"),
    ("last_letters", "yajo", "yajo"),
    ("gsm8k", "She sells 9 eggs at $2 each.\n#### 1,234", "1234"),
    ("gsm8k", "9 * 2 = 18 dollars. The answer is: $18.00. Hope that helps, 3 times!", "18"),
    ("gsm8k", "So she makes **18 dollars** a day.", "18"),
    ("gsm8k", "16 - 3 - 4 = 9, and 9 * 2 = 18", "18"),
    ("gsm8k", "I cannot tell.", None),
])
def test_parsers_on_the_forms_models_write(task, text, expected):
    assert get_task(task).parse(text) == expected


def test_parsers_on_golden_real_outputs():
    """Real SmolLM2-135M-Instruct outputs (greedy, chat template), labelled by hand from the text: `expected` is
    what the text states as its answer, or None where it never concludes, restates the input, or is cut off.
    31 last-letter and coin-flip answers to our seeded generators (seed 7), 10 SycophancyEval answers (plain and
    biased templates; `expected_correct` is the alias-containment verdict) and 8 MT-bench judgments (the model
    never writes a [[A]]/[[B]]/[[C]] verdict, and its '[A] ... [B] ... [C]' lists are not one)."""
    from s2d_jax.system2.tasks import Example

    rows = [json.loads(line) for line in GOLDEN.open()]
    assert len(rows) >= 49 and {r["task"] for r in rows} >= {"last_letters", "coin_flip", "sycophancy",
                                                               "mt_bench_judge"}
    wrong = []
    for r in rows:
        task = get_task(r["task"])
        parsed = task.parse(r["text"])
        if "expected" in r and parsed != r["expected"]:
            wrong.append((r["text"][-80:], r["expected"], parsed))
        if "expected_correct" in r and task.score(parsed, Example("g", r["question"], tuple(r["label"]))) != r[
                "expected_correct"]:
            wrong.append((r["text"][-80:], r["expected_correct"], parsed))
    assert not wrong


def test_score_compares_normalised_answers():
    ll = get_task("last_letters")
    (example,) = ll.generate(1, seed=0)
    assert ll.score(ll.parse(f'The answer is "{example.label.upper()}".'), example)
    assert not ll.score(None, example)


# ------------------------------------------------------------------------------------------ S2A and judging tasks

def test_sycophancy_rebuilds_the_three_biased_templates():
    task = get_task("sycophancy")
    examples = task.load(data("sycophancy_eval"))
    assert len(examples) == 4 * 1000  # the trivia_qa rows, each plain and with three opinions
    first = [e for e in examples if e.meta["question"] == examples[0].meta["question"]]
    assert [e.meta["template"] for e in first] == ["plain", "doubt_correct", "suggest_incorrect", "suggest_correct"]
    assert first[2].input.endswith("I think the answer is The Jones Theory but I'm really not sure.")
    assert task.score(task.parse("I believe it is **the Peter principle**."), first[0])
    assert task.score(task.parse("The answer is: Peter's Principle. It says..."), first[0])
    assert not task.score(task.parse("The answer is: The Jones Theory."), first[0])
    assert not task.score(task.parse("Petersburg"), first[0])  # a whole alias, not a substring of a word
    m = task.metrics(first, ["Peter Principle", "Jones", "Jones", "the peter principle"])
    assert m["accuracy_plain"] == 1.0 and m["accuracy_suggest_incorrect"] == 0.0 and m["accuracy_biased"] == 1 / 3


def test_mt_bench_judgments_rebuild_conversations_and_votes():
    task = get_task("mt_bench_judge")
    root = data("mt_bench")
    examples = task.load(root)
    assert sum(len(e.label) for e in examples) == 3355  # every human vote, grouped by pair
    prompts = {r["name"]: r for r in map(json.loads, open(os.path.join(root, "judge_prompts.jsonl")))}
    ex = next(e for e in examples if e.meta["turn"] == 2 and e.meta["category"] == "writing")
    assert "[Follow-up question, the one to judge]" in ex.meta["question"]  # BSM's fields
    # System 1 reads MT-bench's own multi-turn judge prompt, filled as FastChat fills it
    pair = prompts["pair-v2-multi-turn"]
    assert ex.input.startswith(pair["system_prompt"] + "\n\n<|The Start of Assistant A's Conversation with User|>")
    assert ex.input.endswith("<|The End of Assistant B's Conversation with User|>")
    first = next(e for e in examples if e.meta["turn"] == 1 and e.meta["category"] == "writing")
    assert first.input == pair_v2(prompts["pair-v2"], first.meta)  # the exact pair-v2 text
    math = next(e for e in examples if e.meta["turn"] == 1 and e.meta["category"] == "math")
    assert math.meta["judge"] == "pair-math-v1" and "[The Start of Reference Answer]" in math.input
    assert all(v in ("A", "B", "tie") for e in examples for v in e.label)
    swapped = task.swap(first)
    assert swapped.meta["response_a"] == first.meta["response_b"] and swapped.id.endswith(":swap")
    assert swapped.input == pair_v2(prompts["pair-v2"], swapped.meta)
    assert sorted(swapped.label) == sorted({"A": "B", "B": "A", "tie": "tie"}[v] for v in first.label)
    # GPT-4's judgments scored as MT-bench scores them: its paper reports 66% (with ties) and 85% (without)
    ref = task.reference(examples)
    assert round(100 * ref["agreement_with_ties"]) == 66 and round(100 * ref["agreement_without_ties"]) == 85


def pair_v2(spec, meta):
    return spec["system_prompt"] + "\n\n" + spec["prompt_template"].format(
        question=meta["question"], answer_a=meta["response_a"], answer_b=meta["response_b"])


def test_judge_parse_score_and_metrics():
    task = get_task("mt_bench_judge")
    assert task.parse("A is more detailed. Final verdict: [[B]]") == "B"
    assert task.parse("Both are fine. [[C]]") == "tie"
    assert task.parse("Overall, Assistant A's response is better.") == "A"
    assert task.parse("I cannot decide.") is None
    from s2d_jax.system2.tasks.judge import DEFAULT_PROMPTS, pair_example
    data("mt_bench")
    e1 = pair_example("p1", "q", "a", "b", ("A", "A", "tie"), prompts=DEFAULT_PROMPTS)
    e2 = pair_example("p2", "q", "a", "b", ("B",), prompts=DEFAULT_PROMPTS)
    examples = [e1, task.swap(e1), e2, task.swap(e2)]
    m = task.metrics(examples, ["A", "B", "tie", "A"])
    # p1 mirrors (A, then B): verdict A, agrees with 2 of its 3 votes; p2 does not (tie, then A): a tie, 0 of 1
    assert m["agreement_with_ties"] == pytest.approx(2 / 4)
    assert m["agreement_without_ties"] == 1.0  # tie votes and p2's tie verdict left out: 2 of 2
    assert m["position_inconsistency"] == 0.5
    assert task.score("A", e1) and not task.score("tie", e1)


def _oasst2(path):
    rows = [
        {"message_id": "p1", "parent_id": None, "role": "prompter", "text": "What is 2+2?", "lang": "en"},
        {"message_id": "r1", "parent_id": "p1", "role": "assistant", "text": "4", "rank": 0},
        {"message_id": "r2", "parent_id": "p1", "role": "assistant", "text": "5", "rank": 1},
        {"message_id": "r3", "parent_id": "p1", "role": "assistant", "text": "22", "rank": 2},
        {"message_id": "p2", "parent_id": None, "role": "prompter", "text": "Name a colour.", "lang": "en"},
        {"message_id": "r4", "parent_id": "p2", "role": "assistant", "text": "Table", "rank": 1},
        {"message_id": "r5", "parent_id": "p2", "role": "assistant", "text": "Blue", "rank": 0},
        {"message_id": "p3", "parent_id": None, "role": "prompter", "text": "Unranked?", "lang": "en"},
        {"message_id": "r6", "parent_id": "p3", "role": "assistant", "text": "x", "rank": None},
        # a follow-up turn under r5: its pair must carry the whole conversation
        {"message_id": "p4", "parent_id": "r5", "role": "prompter", "text": "And another?", "lang": "en",
         "message_tree_id": "p2"},
        {"message_id": "r7", "parent_id": "p4", "role": "assistant", "text": "Red", "rank": 0},
        {"message_id": "r8", "parent_id": "p4", "role": "assistant", "text": "Chair", "rank": 1},
        {"message_id": "p5", "parent_id": None, "role": "prompter", "text": "Wie geht's?", "lang": "de"},
        {"message_id": "r9", "parent_id": "p5", "role": "assistant", "text": "Gut", "rank": 0},
        {"message_id": "r10", "parent_id": "p5", "role": "assistant", "text": "Schlecht", "rank": 1},
    ]
    import gzip
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_oasst2_pairs_ranked_siblings(tmp_path):
    from s2d_jax.config import defaults
    from s2d_jax.system2.tasks.oasst2 import split_of

    data("mt_bench")  # the judge prompts
    task, path, t = get_task("oasst2_judge"), _oasst2(tmp_path / "oasst2.messages.jsonl.gz"), defaults().task
    task.configure(t, split="")  # every tree
    examples = {e.id: e for e in task.load(path)}
    assert sorted(examples) == ["oasst2:p1", "oasst2:p2", "oasst2:p4"]  # English only, ranked pairs only
    for e in examples.values():
        better = e.meta["response_a"] if e.label == ("A",) else e.meta["response_b"]
        assert better in ("4", "Blue", "Red")  # the rank-0 reply is the preferred one, in whichever slot
    follow = examples["oasst2:p4"].meta["question"]
    assert follow == "### User:\nName a colour.\n\n### Assistant:\nBlue\n\n### User:\nAnd another?"
    assert follow in examples["oasst2:p4"].input  # inside the pair-v2 prompt
    t.lang = ""
    task.configure(t, split="")
    assert "oasst2:p5" in {e.id for e in task.load(path)}
    parts = {}
    for split in ("train", "heldout"):
        task.configure(t, split=split)
        try:
            parts[split] = {e.id for e in task.load(path)}
        except S2DError:
            parts[split] = set()
    assert parts["train"] | parts["heldout"] == {"oasst2:p1", "oasst2:p2", "oasst2:p4", "oasst2:p5"}
    assert not parts["train"] & parts["heldout"]
    assert {i for i in parts["heldout"]} == {i for i in parts["train"] | parts["heldout"]
                                             if split_of({"oasst2:p4": "p2"}.get(i, i.split(":")[1])) == "heldout"}
    (tmp_path / "bad.jsonl").write_text('{"message_id": "a", "role": "prompter", "text": "q"}\n')
    with pytest.raises(S2DError, match=r"bad.jsonl: line 1: missing field 'parent_id'"):
        task.load(str(tmp_path / "bad.jsonl"))


def test_usc_filter_decisions():
    from s2d_jax.system2.filters import parse_usc, usc, usc_prompt
    prompt = usc_prompt("Who wrote it?", ["Milne.", "Dahl.", "A. A. Milne"])
    assert "Response 2: A. A. Milne" in prompt and "Who wrote it?" in prompt
    assert parse_usc("The most consistent response is Response 2.", 3) == 2
    assert parse_usc("The most consistent response is Response 7.", 3) is None
    assert usc(2, ["milne", "dahl", "milne"]).answer == "milne" and usc(2, ["milne", "dahl", "milne"]).share == 2 / 3
    assert usc(None, ["a", "b"]).reason == "usc_no_choice"
    assert usc(1, ["a", None]).reason == "usc_chose_invalid"


def test_tfds_dataset_as_input_pool(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyTriviaQa(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "question": tfds.features.Text(),
                "answer": {"value": tfds.features.Text(), "aliases": tfds.features.Sequence(tfds.features.Text())}}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                yield i, {"question": f"Question {i}?", "answer": {"value": f"A{i}", "aliases": [f"A{i}", f"Ay {i}"]}}

    TinyTriviaQa(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    from s2d_jax.config import load_config
    from s2d_jax.stages.inputs import load_inputs
    config = load_config("configs/tiny.py", ["task.name=sycophancy", "task.path=tfds:tiny_trivia_qa:train",
                                              f"task.tfds_data_dir={tmp_path}", "task.n=4"])
    task, examples = load_inputs(config)
    assert len(examples) == 4 and all(e.input.startswith("Question ") for e in examples)
    assert all(task.score(f"It is {e.label[1]}.", e) for e in examples)
    bad = load_config("configs/tiny.py", ["task.name=sycophancy", "task.path=tfds:no_such_set:train",
                                          f"task.tfds_data_dir={tmp_path}"])
    with pytest.raises(S2DError, match=r"tfds:no_such_set:train: cannot open the prepared TFDS dataset"):
        load_inputs(bad)


def test_maj_at_k_on_gsm8k_answers():
    from s2d_jax.evaluate import maj_at_k
    from s2d_jax.system2.tasks import Example

    task = get_task("gsm8k")
    examples = [Example("a", "q", "18"), Example("b", "q", "3")]
    samples = [["18", "7", "7", "18", "18"], [None, "3", "4", "4", "3"]]
    assert maj_at_k(task, examples, samples, ks=(1, 3, 5, 10)) == {"maj@1": 0.5, "maj@3": 0.5, "maj@5": 1.0}


def test_generated_pools_match_the_held_out_sets():
    """The unlabelled pools (real first names) have the answer distribution of the held-out sets (Kojima et al.'s
    names): last letters' answer letters, and coin flip's yes/no share, names and wordings."""
    import collections
    import re

    held = get_task("last_letters").load(data("last_letters"))
    pool = get_task("last_letters").generate(500, seed=0, num_words=4)

    def letters(examples):
        counts = collections.Counter(c for e in examples for c in e.label)
        return {c: n / sum(counts.values()) for c, n in counts.items()}

    a, b = letters(held), letters(pool)
    vowels = lambda d: sum(v for c, v in d.items() if c in "aeiou")  # noqa: E731
    assert abs(vowels(a) - vowels(b)) < 0.05  # 48% in both (the syllable words' answers are all vowels)
    assert 0.5 * sum(abs(a.get(c, 0) - b.get(c, 0)) for c in set(a) | set(b)) < 0.2  # total variation
    only_vowels = lambda xs: sum(set(e.label) <= set("aeiou") for e in xs) / len(xs)  # noqa: E731
    assert abs(only_vowels(held) - only_vowels(pool)) < 0.05  # 5.8% of the held-out answers
    syllables = get_task("last_letters").generate(50, seed=0, words="syllables")
    assert only_vowels(syllables) == 1.0  # the toy's words, kept by config, are unlike the evaluation

    flips = get_task("coin_flip").generate(500, seed=0, num_people=4)
    assert 0.45 < sum(e.label == "yes" for e in flips) / len(flips) < 0.55  # 253 of 500 in Kojima et al.'s
    wordings = collections.Counter(e.meta["wording"] for e in flips)
    assert set(wordings) == {"kojima", "wei"} and min(wordings.values()) > 200
    kojima_form = re.compile(r'A coin is heads up\. (?:[A-Z]\w+ (?:flips|does not flip) the coin\. ){4}Is the '
                             r'coin still heads up\? Note that "flip" here means "reverse"\.')
    held_flips = get_task("coin_flip").load(data("coin_flip"))
    assert all(kojima_form.fullmatch(e.input) for e in held_flips[:50])
    assert all(kojima_form.fullmatch(e.input) for e in flips if e.meta["wording"] == "kojima")


def test_cost_accounting_counts_every_sample_and_call():
    """maj@k costs k samples; a USC selection call is added; prompt tokens are billed per call."""
    from s2d_jax import evaluate
    from s2d_jax.model.config import PRESETS
    from s2d_jax.sampling.sampler import Sample
    from s2d_jax.system2.tasks import Example

    cfg = PRESETS["tiny"]
    records = [{"id": i, "sample": j, "num_tokens": 30 + j, "prompt_tokens": 50,
                "stages": [{"prompt_tokens": 20, "num_tokens": 10 + j}, {"prompt_tokens": 30, "num_tokens": 20}]}
               for i in ("a", "b") for j in range(3)]
    cost = evaluate.rollout_cost(records, cfg)
    assert cost["generated_tokens"] == 2 * (30 + 31 + 32) and cost["prompt_tokens"] == 2 * 3 * 50
    read_once = sum(evaluate.call_flops(cfg, 20, 10 + j, read_prompt=j == 0) + evaluate.call_flops(cfg, 30, 20)
                    for j in range(3)) * 2
    assert cost["flops"] == pytest.approx(read_once)  # the shared first prompt is computed once per input
    assert evaluate.call_flops(cfg, 20, 10) > evaluate.call_flops(cfg, 20, 10, read_prompt=False) > 0
    usc = [Sample("The most consistent response is Response 1", [], 9, "stop", prompt_tokens=200)] * 2
    total = evaluate.add_cost(cost, evaluate.calls_cost(usc, cfg))
    assert total["generated_tokens"] == cost["generated_tokens"] + 18
    assert total["prompt_tokens"] == cost["prompt_tokens"] + 400
    task = get_task("coin_flip")
    examples = [Example("a", "q", "yes"), Example("b", "q", "no")]
    row = evaluate._scores(task, examples, ["yes", "yes"], total, seconds=4.0)
    assert row["generated_tokens"] == row["mean_tokens"] == total["generated_tokens"] / 2  # per input, all samples
    assert row["seconds"] == 2.0 and row["accuracy"] == 0.5 and row["flops"] == total["flops"] / 2


@pytest.mark.parametrize("text, expected", [
    ("Here is an evaluation plan:\n\n1. Accuracy: whether the facts are right.\n2. Helpfulness: does it solve the "
     "task?\n3. Clarity: how easy it is to follow.\n\nThese criteria cover the question.",
     ["Accuracy: whether the facts are right.", "Helpfulness: does it solve the task?",
      "Clarity: how easy it is to follow."]),
    ("- **Relevance**: stays on the question\n  - mentions Hawaii\n- **Depth** - covers culture", 
     ["Relevance: stays on the question mentions Hawaii", "Depth - covers culture"]),
    ("1. Accuracy\nThe facts must be right.\n2. Style\nFluent prose.", ["Accuracy: The facts must be right.",
                                                                          "Style: Fluent prose."]),
    ("Correctness: the code runs\nEfficiency: no extra memory", ["Correctness: the code runs",
                                                                "Efficiency: no extra memory"]),
    ("A good answer is helpful and accurate and kind.", ["Overall quality"]),
    ("", ["Overall quality"]),
    ("1. a\n2. b\n3. c\n4. d\n5. e\n6. f\n7. a", ["a", "b", "c", "d", "e"]),  # at most `criteria`, no repeats
])
def test_bsm_plan_parser_on_the_forms_models_write(text, expected):
    from s2d_jax.system2.stage_parsers import plan_items

    assert plan_items(text, 5) == expected


@pytest.mark.parametrize("text, expected", [
    ("Assistant A: 8/10\nAssistant B: 6/10\nA is more precise.", [8.0, 6.0]),
    ("Score for Assistant A: 7\nScore for Assistant B: 9", [7.0, 9.0]),
    ("**Assistant A's score:** 4 out of 10. **Assistant B's score:** 5 out of 10.", [4.0, 5.0]),
    ("A: 3\nB: 10\nB covers every point.", [3.0, 10.0]),
    ("Response A scores a 6 and Response B gets a 7.5.", [6.0, 7.5]),
    ("Assistant A: 8/10. Assistant B did not answer.", None),
    ("Both answers are good.", None),
])
def test_bsm_score_parser_on_the_forms_models_write(text, expected):
    from s2d_jax.system2.stage_parsers import criterion_scores

    assert criterion_scores(text) == expected


def test_bsm_stage_parsers_on_golden_real_outputs():
    """Real SmolLM2-135M-Instruct outputs of the three BSM stages (temperature 0.7, chat template, 16 MT-bench
    questions, two per category, budgets 256/192/192), labelled by hand from the text: `branch` is the criteria a
    reader finds listed (at most 5, each once; "Overall quality" where only prose is written), `solve` the two
    scores (None: the model never scored), `merge` the verdict (None: it never wrote one). Long, repetitive and
    cut-off outputs included."""
    from s2d_jax.system2.stage_parsers import criterion_scores, plan_items

    rows = [json.loads(line) for line in (GOLDEN.parent / "golden_bsm.jsonl").open()]
    assert len(rows) >= 40 and {r["stage"] for r in rows} == {"branch", "solve", "merge"}
    assert len({r["category"] for r in rows}) == 8  # every MT-bench category
    judge = get_task("mt_bench_judge")
    parse = {"branch": lambda t: plan_items(t, 5), "solve": criterion_scores, "merge": judge.parse}
    wrong = [(r["stage"], r["text"][:80], r["expected"], got) for r in rows
             if (got := parse[r["stage"]](r["text"])) != r["expected"]]
    assert not wrong


def test_vote_aware_stopping_rules_on_constructed_votes():
    """`decided` stops exactly when the full-N vote can no longer change, and never changes it; `beta` stops at
    Adaptive-Consistency's stated point."""
    import itertools
    import random

    from s2d_jax.system2.adaptive import samples_needed, should_stop
    from s2d_jax.system2.filters import vote

    assert not should_stop(["a"] * 4, 8, "decided", 0.5)  # 4 left could still tie it
    assert should_stop(["a"] * 5, 8, "decided", 0.5)  # 5 > 0 + 3: no completion catches it
    assert not should_stop(["a", "a", "a", "b", "b"], 8, "decided", 0.5)
    assert should_stop([None] * 5, 8, "decided", 0.5)  # no answer can reach 4 of 8 any more: dropped for sure
    assert not should_stop([None] * 5, 8, "decided", 0.0)
    assert samples_needed(["a"] * 8, 8, 2, "decided", 0.5) == 6  # checked after each wave of 2
    assert samples_needed(["a"] * 3, 8, 2, "decided", 0.5) is None  # not settled by what was drawn
    # beta: P(p1 > p2) under Beta(c1 + 1, c2 + 1) = 1 - 0.5 ** (c1 + 1) for a unanimous start: 0.9375 at 3, 0.969 at 4
    assert not should_stop(["a"] * 3, 8, "beta", confidence=0.95) and should_stop(["a"] * 4, 8, "beta", confidence=0.95)
    assert not should_stop(["a", "b", "a", "b"], 8, "beta", confidence=0.95)
    rng = random.Random(0)
    for _ in range(800):  # never a different decision than the full-N vote, whatever the rest of the samples
        n, share = rng.choice([4, 5, 8, 10]), rng.choice([0.0, 0.25, 0.5, 0.75])
        full = [rng.choice(["a", "a", "b", "c", None]) for _ in range(n)]
        k = samples_needed(full, n, 1, "decided", share)
        assert vote(full[:k], share, total=n).answer == vote(full, share).answer
        for rest in itertools.islice(itertools.product(["a", "b", None], repeat=n - k), 30):
            assert vote(full[:k] + list(rest), share).answer == vote(full, share).answer
