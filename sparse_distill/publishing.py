"""Publishing a finished pipeline run: pick the student to ship, write the summary, plots and results table, and
log them (and the model, and the registry decision) to the run's MLflow parent run.

The orchestration layer wraps `publish_run` in a task and adds its own UI artifacts (`links_markdown`,
`mlflow_run_url`); nothing here knows about it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparse_distill import pipeline
from sparse_distill.config import PipelineConfig
from sparse_distill.data import atomic_write_text
from sparse_distill.mlflow_model import log_student_model
from sparse_distill.tracking import TrackingRef, end_run, set_description

if TYPE_CHECKING:
    from sparse_distill.model_card import ModelRow

log = logging.getLogger(__name__)

Logger = logging.Logger | logging.LoggerAdapter

STUDENT_NAMES = {"teacher": "Teacher", "scratch": "DAN from scratch", "kd": "DAN (KD)", "kdft": "DAN (KD+FT)"}


def best_student(students: Mapping[str, Any]) -> str:
    """The student to ship: KD+FT where the run fine-tuned one, else KD; never the baseline.

    Not the better of the two on dev: the KD+FT stage already keeps each member's distilled weights unless
    fine-tuning beats them on dev, and the merged students' dev accuracies then differ by noise more than by merit.
    Of 309 stored pairs, KD+FT was the lower on dev in 26 (by 0.30 points on average) and still the better on test
    in 19, the worse in 4 (`benchmarks/ship_rule.py`).
    """
    for name in ("kdft", "kd"):
        if name in students:
            return name
    raise ValueError(f"no distilled student to ship: the run has {sorted(students) or 'no students'}")


def report_split(evaluation: dict) -> str:
    """The split the plots and the registry gate use: test, or dev without one."""
    return "test" if "test" in evaluation["metrics"]["teacher"] else "dev"


def write_plots(evaluation: dict, best: str, split: str, plots_dir: Path) -> list[Path]:
    """The best student's confusion matrix and accuracy vs speed for every model, as PNGs in `plots_dir`."""
    from sparse_distill.plots import plot_accuracy_vs_speed, plot_confusion_matrix

    pngs = [
        plot_confusion_matrix(
            evaluation["metrics"][best][split]["confusion"],
            evaluation["labels"],
            plots_dir / "confusion_matrix.png",
            f"{STUDENT_NAMES[best]} on {split}",
        )
    ]
    points = [
        {
            "name": STUDENT_NAMES[k],
            "accuracy": evaluation["metrics"][k][split]["accuracy"],
            "docs_per_s": evaluation["docs_per_s"][k],
        }
        for k in evaluation["docs_per_s"]
    ]
    if fasttext := pipeline.evaluated_fasttext(evaluation):
        points.append(
            {"name": "fastText", "accuracy": fasttext[split]["accuracy"], "docs_per_s": fasttext["docs_per_s"]}
        )
    pngs.append(plot_accuracy_vs_speed(points, plots_dir / "accuracy_vs_speed.png"))
    return pngs


def write_model_cards(
    config: PipelineConfig,
    run_dir: str | Path,
    evaluation: dict,
    students: dict[str, dict],
    best: str,
    tracking: TrackingRef | None,
) -> list[Path]:
    """A `README.md` model card in every student folder (see `sparse_distill.model_card`)."""
    import yaml

    from sparse_distill.model_card import ModelCard, ModelRow, read_fasttext_row, write_model_card
    from sparse_distill.run_store import read_stage

    m, speed = evaluation["metrics"], evaluation["docs_per_s"]
    config_file = Path(run_dir) / "config.yaml"
    config_yaml = (
        config_file.read_text()
        if config_file.exists()
        else yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    )
    try:
        datasets = [
            (d.context, d.name, d.source, d.digest, d.rows)
            for d in pipeline.lineage_datasets(config, Path(run_dir) / "lineage")
        ]
    except OSError as e:  # an input file gone since the run: the card says so rather than failing the publication
        log.warning("model cards: the data is not described (%s)", e)
        datasets = []
    teacher_fp = (read_stage(run_dir, "teacher") or {}).get("teacher_fingerprint")
    # The run's own fastText (evaluate.fasttext), else one a benchmark put in the run folder.
    fasttext = _fasttext_row(evaluation) or read_fasttext_row(run_dir)
    paths = []
    for key, student in students.items():
        rows = [
            ModelRow(
                STUDENT_NAMES[k],
                m[k]["dev"]["accuracy"],
                m[k].get("test", {}).get("accuracy"),
                speed.get(k),
                this_model=k == key,
            )
            for k in ("teacher", "scratch", "kd", "kdft")
            if k in m
        ] + ([fasttext] if fasttext else [])
        uris = []
        if key == best and tracking and (config.tracking.log_model or config.tracking.registered_model):
            uris.append(f"runs:/{tracking.parent_run_id}/student")
            if config.tracking.registered_model:
                uris.append(f"models:/{config.tracking.registered_model}@champion")
        shape_file = Path(student["model_dir"]) / "student.json"
        shape = json.loads(shape_file.read_text()) if shape_file.exists() else {}
        card = ModelCard(
            title=f"{config.name}: {STUDENT_NAMES[key]}" + (" (the shipped student)" if key == best else ""),
            task=f"{config.name} (text column `{config.data.text_column}`, label column `{config.data.label_column}`)",
            labels=list(evaluation["labels"]),
            model_dir=str(Path(student["model_dir"]).resolve()),
            teacher=config.teacher.model,
            teacher_fingerprint=teacher_fp,
            datasets=datasets,
            rows=rows,
            params=student.get("params") or {},
            config_yaml=config_yaml,
            pooling=shape.get("pooling", "mean"),
            table_dtype=shape.get("table_dtype", "float32"),
            members=shape.get("members", 1),
            mlflow_uris=uris,
        )
        paths.append(write_model_card(card))
    return paths


def _fasttext_row(evaluation: dict) -> ModelRow | None:
    """The model cards' row for the fastText the evaluate stage trained, if it did."""
    from sparse_distill.model_card import ModelRow

    fasttext = pipeline.evaluated_fasttext(evaluation)
    if not fasttext:
        return None
    test = fasttext.get("test", {}).get("accuracy")
    return ModelRow(pipeline.FASTTEXT_TITLE, fasttext["dev"]["accuracy"], test, fasttext["docs_per_s"])


def register_best(
    config: PipelineConfig,
    tracking: TrackingRef,
    model_uri: str,
    evaluation: dict,
    split: str,
    logger: Logger | None = None,
) -> dict:
    """Register the logged student and apply the quality gate on `split` (test, or dev without one)."""
    from sparse_distill.registry import register_student

    data = pipeline.load_task_data(config.data)
    gate_split = data.test if split == "test" and data.test is not None else data.dev
    decision = register_student(
        tracking.tracking_uri,
        model_uri,
        config.tracking.registered_model,
        tracking.parent_run_id,
        gate_split.texts,
        gate_split.labels or [],
        evaluation["metrics"]["teacher"][split]["accuracy"],
        config.tracking.min_retention,
        split_name=split,
    )
    (logger or log).info(
        "registry: %r v%s is the %s (%s)", decision.name, decision.version, decision.alias, decision.reason
    )
    return {**asdict(decision), "model_uri": decision.model_uri}


def _log_to_mlflow(
    config: PipelineConfig,
    tracking: TrackingRef,
    summary: dict,
    evaluation: dict,
    model_dir: str,
    split: str,
    pngs: list[Path],
    table: str,
    logger: Logger,
) -> None:
    """The model (when logged or registered), the registry decision, the summary's numbers, plots and table; then
    the parent run ends (FAILED when registering raises)."""
    if config.tracking.log_model or config.tracking.registered_model:
        # Registering needs the logged model, so a registered_model logs it whatever log_model says.
        summary["mlflow_model_uri"] = log_student_model(model_dir, tracking.parent_run_id, tracking.tracking_uri)
    if config.tracking.registered_model:
        try:
            uri = summary["mlflow_model_uri"]
            summary["registry"] = register_best(config, tracking, uri, evaluation, split, logger)
        except Exception:
            end_run(tracking.tracking_uri, tracking.parent_run_id, status="FAILED")
            raise
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri)
    for k, v in summary.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            client.log_metric(tracking.parent_run_id, k, float(v))
    for png in pngs:
        client.log_artifact(tracking.parent_run_id, str(png), "plots")
    client.log_artifact(tracking.parent_run_id, str(Path(model_dir) / "label_map.json"))
    client.log_text(tracking.parent_run_id, table, "results.md")
    # A tag, so that runs whose teacher was the weak link can be searched for (tags.findings != "none").
    client.set_tag(tracking.parent_run_id, "findings", "; ".join(summary.get("findings") or []) or "none")
    # The run's description in the MLflow UI.
    set_description(tracking.tracking_uri, tracking.parent_run_id, table)
    end_run(tracking.tracking_uri, tracking.parent_run_id)


def publish_run(
    config: PipelineConfig,
    run_dir: str | Path,
    config_fp: str,
    tracking: TrackingRef | None,
    evaluation: dict,
    students: dict[str, dict],
    logger: Logger | None = None,
) -> dict:
    """Write summary.json, plots and results.md into `run_dir`; log them and the best student to MLflow (when
    tracking is on). Returns the summary (with `mlflow_model_uri` and `registry` when those happened)."""
    logger = logger or log
    best = best_student(students)
    summary = pipeline.build_summary(
        config,
        evaluation,
        students,
        best,
        tracking.parent_run_id if tracking else None,
        config_fp,
        pipeline.run_choices(config, run_dir),
    )
    run_path = Path(run_dir)
    split = report_split(evaluation)
    pngs = write_plots(evaluation, best, split, run_path / "plots")
    table = pipeline.results_table(summary)
    # Before the model is logged: the card travels with the student folder into MLflow.
    write_model_cards(config, run_dir, evaluation, students, best, tracking)
    if tracking:
        _log_to_mlflow(config, tracking, summary, evaluation, students[best]["model_dir"], split, pngs, table, logger)
    elif config.tracking.registered_model:
        logger.warning("tracking is off: the student is not registered as %r", config.tracking.registered_model)
    atomic_write_text(run_path / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(run_path / "results.md", table + "\n")
    return summary


def mlflow_run_url(tracking: TrackingRef) -> str:
    """The run's page in the MLflow UI (for a sqlite store, where `make mlflow-ui` serves it)."""
    base = (
        tracking.tracking_uri if tracking.tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    )
    return f"{base.rstrip('/')}/#/experiments/{tracking.experiment_id}/runs/{tracking.parent_run_id}"


def links_markdown(tracking: TrackingRef | None, registry: dict | None) -> str:
    """Markdown lines linking the MLflow run and saying the registry decision ('' when tracking is off)."""
    if tracking is None:
        return ""
    lines = [
        f"\n\nMLflow run: [{tracking.parent_run_id}]({mlflow_run_url(tracking)}) (store `{tracking.tracking_uri}`)"
    ]
    if registry:
        lines.append(
            f"Registry: `{registry['name']}` version {registry['version']} is the **{registry['alias']}**: "
            f"{registry['reason']}"
        )
    return "\n\n".join(lines) + "\n"
