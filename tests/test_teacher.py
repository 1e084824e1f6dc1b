"""A teacher that is not the student: SmolLM2-135M (BPE tokenizer, chat template) writes the System 2 rollouts a
2-layer byte-level student is distilled on; `s2d plan` sizes generation for the teacher."""

import json

from s2d_jax.cli import main
from s2d_jax.config import load_config

TINY = ["--config", "configs/tiny.py"]


def test_a_teacher_with_another_tokenizer_and_size_end_to_end(tmp_path, smollm2_gguf):
    """SmolLM2-135M (its BPE tokenizer and chat template) writes the rollouts; the 2-layer byte-level student is
    trained on their text."""
    from s2d_jax.tokenizer import chat_prompt, load_tokenizer

    args = ["run", *TINY, "--workdir", str(tmp_path), f"--config.teacher.path={smollm2_gguf}",
            "--config.pretrain.steps=0",  # the student need not know anything: it is taught the teacher's text
            "--config.filter.name=none", "--config.program.max_new_tokens=24", "--config.task.n=4",
            "--config.eval.n=4"]
    assert main(args) == 0
    teacher = load_tokenizer(smollm2_gguf)
    rows = [json.loads(x) for x in open(tmp_path / "rollouts.jsonl")]
    first = rows[0]["stages"][0]
    assert first["prompt_tokens"] == len(teacher(chat_prompt(teacher, first["prompt"]),
                                                 add_special_tokens=False).input_ids)
    assert first["prompt_tokens"] < len(first["prompt"].encode())  # not the student's byte tokens
    kept = [json.loads(x) for x in open(tmp_path / "distill.jsonl")]
    assert kept and (tmp_path / "model").exists()  # the student trained on the teacher's answers, as text
    results = json.load(open(tmp_path / "eval.json"))
    assert results["meta"]["models"]["system2"] == f"teacher {smollm2_gguf}"
    assert results["system2"]["flops"] > 50 * results["system1"]["flops"]  # counted at the teacher's size
    assert "System 2 (program, teacher" in (tmp_path / "report.md").read_text()


def test_the_plan_sizes_generation_for_the_teacher():
    from s2d_jax.plan import estimate as plan_lib

    student = load_config("configs/tiny.py")
    taught = load_config("configs/tiny.py", ["teacher.preset=toy", "teacher.tokenizer=bytes"])
    mesh = plan_lib.mesh_shape(student.mesh, 1)
    alone, with_teacher = plan_lib.plan(student, mesh), plan_lib.plan(taught, mesh)
    assert with_teacher["train_total"] == alone["train_total"]  # the student trains either way
    assert with_teacher["generate_num_params"] > alone["generate_num_params"] == alone["num_params"]
    assert with_teacher["generate_params"] > alone["generate_params"]
    assert "the teacher's" in plan_lib.report(with_teacher)
