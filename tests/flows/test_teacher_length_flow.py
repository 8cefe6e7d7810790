"""teacher.max_length "auto": the flow chooses the length from the texts as a stage of its own (cached), and the
teacher fine-tunes with what it chose."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_the_teacher_fine_tunes_with_the_length_the_stage_chose(tiny_config, tmp_path):
    from flows.pipeline_flow import finetune_teacher_flow
    from sparse_distill.pipeline import run_choices, split_config
    from sparse_distill.run_store import read_stage
    from sparse_distill.teacher import training_info

    config = tiny_config.model_copy(update={"teacher": tiny_config.teacher.model_copy(update={"max_length": "auto"})})
    run_dir = tmp_path / "run"
    teacher = finetune_teacher_flow(config=config, run_dir=str(run_dir))
    chosen = read_stage(run_dir, "teacher_length")
    assert chosen["max_length"] == 32 == training_info(teacher["model_dir"])["max_length"]
    resolved = split_config(config, run_dir)
    assert resolved.teacher.max_length == 32
    assert run_choices(resolved, run_dir)["teacher_length"].startswith("teacher.max_length 32: auto: 90% of the train")

    # The same run with the number written out finds its teacher done: "auto" keyed it as 32.
    again = finetune_teacher_flow(config=tiny_config, run_dir=str(run_dir))
    assert again["teacher_fingerprint"] == teacher["teacher_fingerprint"] and again["seconds"] == teacher["seconds"]
