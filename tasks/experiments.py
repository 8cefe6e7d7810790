"""Prefect tasks of the experiments: start tracking, run one experiment over a base run, publish its table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from sparse_distill import experiments
from sparse_distill.config import ExperimentConfig, PipelineConfig
from sparse_distill.mlflow_model import ensure_experiment, resolve_tracking_uri
from sparse_distill.tracking import StageRun, TrackingRef, end_run, flatten, start_parent_run


class VariantRuns:
    """One nested MLflow run per variant, created when the variant first reports a metric."""

    def __init__(self, ref: TrackingRef) -> None:
        from mlflow.tracking import MlflowClient

        self.ref = ref
        self.client = MlflowClient(ref.tracking_uri)
        self.runs: dict[str, StageRun] = {}

    def __call__(self, variant: str, step: int, metrics: dict[str, float]) -> None:
        if variant not in self.runs:
            run = self.client.create_run(
                self.ref.experiment_id,
                run_name=variant,
                tags={"mlflow.parentRunId": self.ref.parent_run_id, "sparse_distill.variant": variant},
            )
            self.runs[variant] = StageRun(self.client, run.info.run_id)
        self.runs[variant].log_metrics(step, metrics)

    def close(self, status: str = "FINISHED") -> None:
        for run in self.runs.values():
            self.client.set_terminated(run.run_id, status=status)


@task(name="start-experiment-tracking", cache_policy=NO_CACHE)
def start_experiment_tracking(
    name: str, config: ExperimentConfig, pipeline: PipelineConfig, flow_run_id: str | None
) -> TrackingRef:
    """The experiment's parent MLflow run (`<experiment>-<task>`), with its config as params."""
    uri = resolve_tracking_uri(config.tracking.tracking_uri, Path.cwd())
    exp_id = ensure_experiment(config.tracking.experiment, uri, Path.cwd() / "mlartifacts")
    tags = {"sparse_distill.experiment": name, "sparse_distill.task": pipeline.name}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    params = {"experiment": name, "pipeline": config.pipeline, "section": _section(config, name)}
    run_id = start_parent_run(uri, exp_id, f"{name}-{pipeline.name}", params, tags)
    get_run_logger().info("MLflow run %s in %s", run_id, uri)
    return TrackingRef(uri, exp_id, run_id)


def _section(config: ExperimentConfig, name: str) -> dict[str, Any]:
    dumped = config.model_dump(mode="json")
    return {"train": dumped["train"], name: dumped.get(name)}


@task(name="run-experiment", cache_policy=NO_CACHE)
def run_experiment(
    name: str, config: ExperimentConfig, pipeline: PipelineConfig, run_dir: str, tracking: TrackingRef | None
) -> dict[str, Any]:
    """Run one experiment; its variants resume from their own results on disk. Returns a small manifest."""
    base = experiments.BaseRun.from_run_dir(pipeline, run_dir)
    variants = VariantRuns(tracking) if tracking else None
    try:
        result = experiments.run_experiment(name, config, base, variants)
    except BaseException:
        if variants:
            variants.close("FAILED")
        if tracking:
            end_run(tracking.tracking_uri, tracking.parent_run_id, status="FAILED")
        raise
    if variants:
        variants.close()
    get_run_logger().info("%s:\n%s", name, result.table)
    return {
        "name": name,
        "task": pipeline.name,
        "out_dir": str(result.out_dir),
        "table": result.table,
        "rows": result.rows,
        "info": result.info,
        "plots": result.plots,
    }


def _metric_key(title: str) -> str:
    # MLflow keys allow letters, digits and _-. /; the row's title becomes a readable prefix.
    return re.sub(r"[^A-Za-z0-9_\-. /]+", "_", title).strip("_")[:200]


@task(name="publish-experiment", cache_policy=NO_CACHE)
def publish_experiment(result: dict[str, Any], config: ExperimentConfig, tracking: TrackingRef | None) -> dict:
    """The table as a Prefect artifact; rows as metrics, table, JSON and plots in MLflow; the cascade as a model."""
    name, table = result["name"], result["table"]
    create_markdown_artifact(table, key=f"experiment-{name}", description=f"{name} on {result['task']}")
    if tracking is None:
        return result
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri)
    run_id = tracking.parent_run_id
    for row in result["rows"]:
        title = row.get("model") or row.get("task") or f"threshold {row.get('threshold', 0):.4f}"
        for key, value in flatten(row).items():
            try:
                number = float(value)
            except ValueError:
                continue
            if key not in ("model", "task") and number == number:
                client.log_metric(run_id, f"{_metric_key(title)}/{key}", number)
    client.log_text(run_id, table, "results.md")
    client.log_artifact(run_id, str(Path(result["out_dir"]) / "results.json"))
    for png in result["plots"]:
        client.log_artifact(run_id, png, "plots")
    info = result["info"]
    if name == "cascade" and config.cascade.log_model and info.get("threshold") is not None:
        from sparse_distill.mlflow_model import log_cascade_model

        uri = log_cascade_model(
            info["student_dir"],
            info["teacher_dir"],
            info["threshold"],
            info["metric"],
            run_id,
            tracking.tracking_uri,
            max_length=info["teacher_max_length"],
        )
        result = {**result, "model_uri": uri}
        get_run_logger().info("cascade logged as %s", uri)
    end_run(tracking.tracking_uri, run_id)
    return result
