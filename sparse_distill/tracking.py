"""MLflow tracking with explicit run ids: a parent run per pipeline run, a nested run per stage.

Run ids are passed explicitly (never the thread-local active run), because stages run in worker threads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts as `a.b.c` keys with string values (MLflow params are strings, at most 6000 chars)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = str(obj)[:6000]
    return out


@dataclass(frozen=True)
class TrackingRef:
    """Where to log: small and picklable, so it can be passed to Prefect tasks."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str


class StageRun:
    """A nested MLflow run for one stage: params, stepped metrics, artifacts."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_params(self, params: dict[str, Any]) -> None:
        for k, v in flatten(params).items():
            self.client.log_param(self.run_id, k, v)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.client.log_metric(self.run_id, k, float(v), step=step)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)


def start_parent_run(
    tracking_uri: str, experiment_id: str, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None
) -> str:
    """Create the pipeline's parent run and log the config as params; returns its id."""
    client = MlflowClient(tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
    for k, v in flatten(params).items():
        client.log_param(run.info.run_id, k, v)
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


@contextmanager
def stage_run(ref: TrackingRef | None, stage: str, params: dict[str, Any] | None = None) -> Iterator[StageRun | None]:
    """A nested run under the parent; marked FAILED if the stage raises. Yields None when tracking is off."""
    if ref is None:
        yield None
        return
    client = MlflowClient(ref.tracking_uri)
    run = client.create_run(
        ref.experiment_id, run_name=stage, tags={"mlflow.parentRunId": ref.parent_run_id, "sparse_distill.stage": stage}
    )
    sr = StageRun(client, run.info.run_id)
    if params:
        sr.log_params(params)
    try:
        yield sr
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Set tags on an MLflow run (finished or not)."""
    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
