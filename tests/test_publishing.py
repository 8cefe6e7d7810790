"""Publishing a finished run without Prefect: the student chosen, summary.json, results.md and the plots, the links
markdown, and what goes to the MLflow parent run (numbers, plots, the table; the model only when asked for)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sparse_distill import pipeline
from sparse_distill.config import PipelineConfig
from sparse_distill.mlflow_model import ensure_experiment, tracking_uri_default
from sparse_distill.publishing import best_student, links_markdown, mlflow_run_url, publish_run, report_split
from sparse_distill.tracking import TrackingRef, set_tags, start_parent_run


def _metrics(dev: float, test: float) -> dict:
    confusion = [[3, 1], [1, 3]]
    return {
        "dev": {"accuracy": dev, "macro_f1": dev - 0.01, "confusion": confusion},
        "test": {"accuracy": test, "macro_f1": test - 0.01, "confusion": confusion},
    }


EVALUATION = {
    "metrics": {
        "teacher": _metrics(0.9, 0.88),
        "scratch": _metrics(0.95, 0.7),  # the best on dev, but the baseline is never shipped
        "kd": _metrics(0.86, 0.79),  # better on dev than KD+FT, but KD+FT is shipped where there is one
        "kdft": _metrics(0.85, 0.8),
    },
    "docs_per_s": {"teacher": 100.0, "scratch": 9000.0, "kd": 10000.0, "kdft": 10000.0},
    "labels": ["neg", "pos"],
}


def _students(tmp_path: Path) -> dict[str, dict]:
    out = {}
    for k in ("scratch", "kd", "kdft"):
        model_dir = tmp_path / "models" / k
        model_dir.mkdir(parents=True)
        (model_dir / "label_map.json").write_text('{"labels": ["neg", "pos"]}')
        out[k] = {"model_dir": str(model_dir), "params": {"total": 1234, "embedding": 1200}}
    return out


def _config(tmp_path: Path, **tracking) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": "pub",
            "data": {"data_dir": str(tmp_path), "train": "train.parquet", "dev": "dev.parquet"},
            "teacher": {"model": "unused"},
            "tracking": tracking,
        }
    )


def test_the_shipped_student_is_kdft_where_there_is_one_else_kd() -> None:
    assert best_student({"scratch": {}, "kd": {}, "kdft": {}}) == "kdft"
    assert best_student({"scratch": {}, "kd": {}}) == "kd"
    with pytest.raises(ValueError, match="no distilled student to ship: the run has \\['scratch'\\]"):
        best_student({"scratch": {}})
    assert report_split(EVALUATION) == "test"
    dev_only = {**EVALUATION, "metrics": {k: {"dev": v["dev"]} for k, v in EVALUATION["metrics"].items()}}
    assert report_split(dev_only) == "dev"


def test_publish_without_tracking_writes_the_summary_table_and_plots(tmp_path: Path, caplog) -> None:
    config = _config(tmp_path, registered_model="nowhere")
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        summary = publish_run(config, run_dir, "fp123", None, EVALUATION, _students(tmp_path))
    assert summary["best_student"] == "kdft" and summary["mlflow_run_id"] is None
    assert summary["config_fingerprint"] == "fp123" and "mlflow_model_uri" not in summary and "registry" not in summary
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert (run_dir / "results.md").read_text() == pipeline.results_table(summary) + "\n"
    assert (run_dir / "plots" / "confusion_matrix.png").stat().st_size > 0
    assert (run_dir / "plots" / "accuracy_vs_speed.png").stat().st_size > 0
    assert "not registered as 'nowhere'" in caplog.text
    assert links_markdown(None, None) == ""
    # A model card in every student folder; the shipped one says so.
    kdft_card = (tmp_path / "models" / "kdft" / "README.md").read_text()
    assert kdft_card.startswith("# pub: DAN (KD+FT) (the shipped student)")
    assert "| **DAN (KD+FT)** (this model) | 0.8500 | 0.8000 | 10,000 |" in kdft_card
    assert "| Teacher | 0.9000 | 0.8800 | 100 |" in kdft_card and "fastText" not in kdft_card
    assert "load_student(" in kdft_card and "name: pub" in kdft_card
    scratch_card = (tmp_path / "models" / "scratch" / "README.md").read_text()
    assert "| **DAN from scratch** (this model) |" in scratch_card and "shipped" not in scratch_card


def test_the_runs_fasttext_is_a_row_a_line_a_plot_point_and_a_card_row(tmp_path: Path) -> None:
    fasttext = {**_metrics(0.78, 0.76), "docs_per_s": 50000.0, "settings": {"wordNgrams": 2}}
    evaluation = {**EVALUATION, "baselines": {"fasttext": fasttext}}
    students = _students(tmp_path)
    summary = publish_run(_config(tmp_path), tmp_path / "run", "fp", None, evaluation, students)
    # On test: the student (kdft) 0.80, the teacher 0.88, fastText 0.76: 4 of the teacher's 12 points kept.
    assert summary["fasttext_accuracy_test"] == 0.76 and summary["fasttext_split"] == "test"
    assert summary["student_over_fasttext"] == pytest.approx(0.04)
    assert summary["lead_kept"] == pytest.approx(1 / 3)
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| fastText (word bigrams, 25 epochs) | 0.7800 | 0.7700 | 0.7600 |" in table
    assert "against fastText (test): student +4.0 points, teacher +12.0" in table and "keeps 33 % of" in table
    card = (tmp_path / "models" / "kdft" / "README.md").read_text()
    assert "| fastText (word bigrams, 25 epochs) | 0.7800 | 0.7600 | 50,000 |" in card
    # A teacher within 2 points of fastText has no lead to keep.
    close = {**fasttext, "test": {**fasttext["test"], "accuracy": 0.87}}
    summary = pipeline.build_summary(
        _config(tmp_path), {**evaluation, "baselines": {"fasttext": close}}, students, "kdft", None, "fp"
    )
    assert summary["lead_kept"] is None and summary["student_over_fasttext"] == pytest.approx(-0.07)
    assert "no lead to keep" in pipeline.results_table(summary)


def test_the_summary_says_where_the_teacher_is_the_weak_link(tmp_path: Path, caplog) -> None:
    students = _students(tmp_path)
    # EVALUATION's teacher (0.90 on dev) is under the DAN from scratch (0.95), and so is the shipped KD+FT (0.85).
    with caplog.at_level(logging.WARNING):
        summary = publish_run(_config(tmp_path), tmp_path / "run", "fp", None, EVALUATION, students)
    first, second = summary["findings"]
    assert "teacher (0.900 on dev) is not ahead of the DAN trained on the gold labels alone (0.950)" in first
    assert "shipped student (KD+FT, 0.850 on dev) is under the DAN from scratch (0.950)" in second
    assert "students/scratch/model" in second and "not ahead of the DAN" in caplog.text
    table = (tmp_path / "run" / "results.md").read_text()
    assert "Findings (dev):\n- the teacher (0.900 on dev) is not ahead" in table
    # A teacher ahead of both: nothing to say, and no findings block.
    strong = {**EVALUATION["metrics"], "scratch": _metrics(0.8, 0.7)}
    fasttext = {**_metrics(0.7, 0.7), "docs_per_s": 1.0, "settings": {}}
    evaluation = {**EVALUATION, "metrics": strong, "baselines": {"fasttext": fasttext}}
    summary = pipeline.build_summary(_config(tmp_path), evaluation, students, "kdft", None, "fp")
    assert summary["findings"] == [] and "Findings" not in pipeline.results_table(summary)
    # Within 2 points of fastText on dev: the teacher has little lead over it to pass on.
    close = {**fasttext, "dev": {**fasttext["dev"], "accuracy": 0.885}}
    summary = pipeline.build_summary(
        _config(tmp_path), {**evaluation, "baselines": {"fasttext": close}}, students, "kdft", None, "fp"
    )
    assert summary["findings"] == [
        "the teacher (0.900 on dev) leads fastText (0.885) by 2 points or less: a student distilled from it can lead "
        "fastText by little more"
    ]


@pytest.mark.parametrize("log_model", [False, True])
def test_publish_logs_numbers_plots_and_table_to_the_parent_run(tmp_path: Path, monkeypatch, log_model: bool) -> None:
    import sparse_distill.publishing as publishing

    (tmp_path / "mlflow").mkdir()
    uri = tracking_uri_default(tmp_path / "mlflow")
    exp = ensure_experiment("publish-test", uri, tmp_path / "mlflow" / "artifacts")
    tracking = TrackingRef(uri, exp, start_parent_run(uri, exp, "pub", {}))
    logged = []
    monkeypatch.setattr(publishing, "log_student_model", lambda d, run, u: logged.append((d, run, u)) or "models:/m-1")
    students = _students(tmp_path)
    summary = publish_run(
        _config(tmp_path, log_model=log_model), tmp_path / "run", "fp", tracking, EVALUATION, students
    )

    assert logged == ([(students["kdft"]["model_dir"], tracking.parent_run_id, uri)] if log_model else [])
    assert summary.get("mlflow_model_uri") == ("models:/m-1" if log_model else None)
    client = MlflowClient(uri)
    run = client.get_run(tracking.parent_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["speedup"] == pytest.approx(100.0) and run.data.metrics["student_params"] == 1234
    assert "best_student" not in run.data.metrics  # numbers only
    assert run.data.tags["findings"].startswith("the teacher (0.900 on dev) is not ahead")
    paths = {a.path for a in client.list_artifacts(tracking.parent_run_id)}
    assert {"plots", "label_map.json", "results.md"} <= paths
    assert {a.path for a in client.list_artifacts(tracking.parent_run_id, "plots")} == {
        "plots/confusion_matrix.png",
        "plots/accuracy_vs_speed.png",
    }
    md = links_markdown(tracking, {"name": "dan", "version": "2", "alias": "champion", "reason": "better"})
    assert mlflow_run_url(tracking) in md and "`dan` version 2 is the **champion**: better" in md
    assert mlflow_run_url(tracking).startswith("http://127.0.0.1:5000/#/experiments/")
    set_tags(uri, tracking.parent_run_id, {"k": "v"})
    assert client.get_run(tracking.parent_run_id).data.tags["k"] == "v"
