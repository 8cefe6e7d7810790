"""End to end: the whole pipeline on a tiny config, then again from cache, with MLflow checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from sparse_distill.config import fingerprint
from sparse_distill.run_store import RESULT

pytestmark = pytest.mark.usefixtures("prefect_harness")

SUMMARY_KEYS = {
    "teacher_accuracy",
    "student_scratch_accuracy",
    "student_kd_accuracy",
    "student_kdft_accuracy",
    "teacher_accuracy_test",
    "student_scratch_accuracy_test",
    "student_kd_accuracy_test",
    "student_kdft_accuracy_test",
    "retention",
    "teacher_docs_per_s",
    "student_docs_per_s",
    "speedup",
    "student_params",
    "mlflow_run_id",
    "config_fingerprint",
}


@pytest.mark.slow
def test_pipeline_runs_then_serves_from_cache(tiny_config, tmp_path, task_states):
    from flows.pipeline_flow import pipeline_flow

    run_dir = tmp_path / "run"
    state = pipeline_flow(config=tiny_config, run_dir=str(run_dir), return_state=True)
    assert state.is_completed()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["config_fingerprint"] == fingerprint(tiny_config)
    assert 0 <= summary["student_kd_accuracy"] <= 1 and summary["speedup"] > 0
    # The summary says how long the teacher trained and why (the tiny config sets its epochs).
    assert summary["choices"]["budget_teacher"].endswith("(epochs set)")
    # The tiny teacher is a BERT: teacher.pooling auto gave its head the mean of the token states.
    assert summary["choices"]["teacher_pooling"].startswith("teacher.pooling auto: mean (the model's classifier")
    # The student is the default 5 members, each on 16 // 5 = 3 columns; each stage says how each member did.
    assert "shared by 5 members of 3 columns each" in summary["choices"]["table"]
    assert all("per member (dev accuracy alone" in summary["choices"][f"budget_{s}"] for s in ("distill", "kdft"))
    # fastText trained on the same train rows stands beside the students (evaluate.fasttext), in MLflow too.
    assert 0 <= summary["fasttext_accuracy_test"] <= 1 and summary["fasttext_split"] == "test"
    assert "| fastText (word bigrams, 25 epochs) |" in (run_dir / "results.md").read_text()
    assert "against fastText (test): student" in (run_dir / "results.md").read_text()
    first = task_states(state.state_details.flow_run_id)
    assert all(s == "Completed" for s in first.values()), first

    # MLflow: the parent run, one nested run per stage, the model loadable from raw text.
    client = MlflowClient(tiny_config.tracking.tracking_uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.params["teacher.max_length"] == "32"
    assert parent.data.metrics["fasttext_accuracy_test"] == summary["fasttext_accuracy_test"]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_name for r in children} >= {
        "finetune-teacher",
        "label-train",
        "label-corpus",
        "vocab",
        "distill",
        "finetune-student",
        "scratch",
        "evaluate",
    }
    # Lineage: the data as dataset inputs, the results as the description, the config file, each stage's cache key.
    inputs = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    assert set(inputs) == {"train.parquet", "dev.parquet", "test.parquet", "corpus (1 files)"}
    assert json.loads(inputs["train.parquet"].dataset.profile) == {"num_rows": 300}
    assert json.loads(inputs["corpus (1 files)"].dataset.profile) == {"num_rows": 400}
    assert {t.value for d in inputs.values() for t in d.tags} == {"train", "dev", "test", "corpus"}
    parent = client.get_run(parent.info.run_id)  # ended: the description is set at publishing
    assert parent.data.tags["mlflow.note.content"].startswith("| model | dev acc |")
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    for r in children:
        if r.info.run_name in ("distill", "evaluate"):
            assert r.data.tags["sparse_distill.cache_hit"] == "false"
            assert r.data.tags["sparse_distill.cache_key"].startswith("sparse-distill-")
    evaluate_run = next(r for r in children if r.info.run_name == "evaluate")
    assert {a.path for a in client.list_artifacts(evaluate_run.info.run_id, "explanations")} == {
        "explanations/errors_explained.json",
        "explanations/errors_explained.md",
    }
    assert (run_dir / "evaluation" / "errors_explained.md").read_text().startswith("# Dev errors, explained")
    # A model card in every student folder, logged with the model.
    for student in ("kd", "kdft", "scratch"):
        assert (run_dir / "students" / student / "model" / "README.md").exists() or any(
            (run_dir / "students" / student).rglob("README.md")
        )
    distill_run = next(r for r in children if r.info.run_name == "distill")
    # A learning curve per member (3 by default), and the merged student's dev accuracy.
    for m in range(3):
        assert len(client.get_metric_history(distill_run.info.run_id, f"kd_member{m}_dev_accuracy")) >= 2
    assert len(client.get_metric_history(distill_run.info.run_id, "kd_dev_accuracy")) == 1
    mlflow.set_tracking_uri(tiny_config.tracking.tracking_uri)
    model = mlflow.pyfunc.load_model(summary["mlflow_model_uri"])
    out = model.predict(pd.DataFrame({"text": ["a wonderful and moving film", "dull and tedious"]}))
    assert list(out["label"].map(str)) and set(out["label"]) <= {"pos", "neg"}

    # Second run, same config: every stage served from cache.
    state2 = pipeline_flow(config=tiny_config, run_dir=str(run_dir), return_state=True)
    assert state2.is_completed()
    second = task_states(state2.state_details.flow_run_id)
    always = ("start-tracking", "publish-results", "log-cached-stages")
    cached = {k: v for k, v in second.items() if not k.startswith(always)}
    assert cached and all(v == "Cached" for v in cached.values()), second
    second_id = json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"]
    hits = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{second_id}'")
    assert {r.info.run_name for r in hits} >= {"distill (cached)", "evaluate (cached)", "finetune-teacher (cached)"}
    assert all(r.data.tags["sparse_distill.cache_hit"] == "true" for r in hits)

    # Change only the fine-tuning config: KD+FT and evaluation recompute, nothing upstream.
    changed = tiny_config.model_copy(deep=True)
    changed.finetune.lr = 5e-4
    state3 = pipeline_flow(config=changed, run_dir=str(run_dir), return_state=True)
    third = task_states(state3.state_details.flow_run_id)
    recomputed = {k.rsplit("-", 1)[0] for k, v in third.items() if v == "Completed"}
    assert {"kdft", "evaluate"} <= recomputed
    assert not recomputed & {"teacher", "label-train", "label-corpus", "vocab", "distill", "scratch"}, third
    assert Path(run_dir / "summary.json").exists()

    # Train labels recorded for another teacher's weights (as after a teacher trained again under the same key, with
    # Prefect's cache gone): the stage is made again, not trusted for its key and refused later by the distillation.
    train_record = run_dir / "labels" / "train" / RESULT
    record = json.loads(train_record.read_text())
    train_record.write_text(json.dumps({**record, "teacher_fingerprint": "another-teacher"}))
    state4 = pipeline_flow(config=changed, run_dir=str(run_dir), return_state=True)
    assert state4.is_completed()
    fourth = task_states(state4.state_details.flow_run_id)
    recomputed = {k.rsplit("-", 1)[0] for k, v in fourth.items() if v == "Completed"}
    assert "label-train" in recomputed and "label-corpus" not in recomputed, fourth
    assert json.loads(train_record.read_text())["teacher_fingerprint"] == record["teacher_fingerprint"]

    # Prefect's cache gone (another PREFECT_HOME, a cleared cache, another machine on the same run folder): the
    # stages the run store calls fresh return their records; the teacher and the students are not trained again.
    def stamps() -> dict[str, int]:
        return {d: (run_dir / d / RESULT).stat().st_mtime_ns for d in ("teacher", "students/kd", "students/kdft")}

    before = stamps()
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "another-prefect-storage"}):
        state5 = pipeline_flow(config=changed, run_dir=str(run_dir), return_state=True)
    assert state5.is_completed()
    fifth = {k.rsplit("-", 1)[0]: v for k, v in task_states(state5.state_details.flow_run_id).items()}
    assert fifth["teacher"] == "Completed", fifth  # a miss for Prefect: the task ran, and only read the record
    assert stamps() == before

    # A run folder copied to a new path: its records name the old folder's files, so the stages run again there.
    copied = tmp_path / "copied"
    shutil.copytree(run_dir, copied)
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "another-prefect-storage"}):
        assert pipeline_flow(config=changed, run_dir=str(copied), return_state=True).is_completed()
    assert json.loads((copied / "teacher" / RESULT).read_text())["out_dir"] == str(copied / "teacher")
