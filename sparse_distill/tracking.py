"""MLflow tracking with explicit run ids: a parent run per pipeline run, a nested run per stage.

Run ids are passed explicitly (never the thread-local active run), because stages run in worker threads.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
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


# Tags of a stage's nested run: its cache key (`run_store.stage_key`) and whether the stage was served from cache.
CACHE_KEY_TAG = "sparse_distill.cache_key"
CACHE_HIT_TAG = "sparse_distill.cache_hit"


@contextmanager
def stage_run(
    ref: TrackingRef | None, stage: str, params: dict[str, Any] | None = None, cache_key: str | None = None
) -> Iterator[StageRun | None]:
    """A nested run under the parent (tagged with the stage's `cache_key` and as computed, not served from cache);
    marked FAILED if the stage raises. Yields None when tracking is off."""
    if ref is None:
        yield None
        return
    client = MlflowClient(ref.tracking_uri)
    tags = {"mlflow.parentRunId": ref.parent_run_id, "sparse_distill.stage": stage}
    if cache_key:
        tags.update({CACHE_KEY_TAG: cache_key, CACHE_HIT_TAG: "false"})
    run = client.create_run(ref.experiment_id, run_name=stage, tags=tags)
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


def log_cached_stage(ref: TrackingRef, stage: str, cache_key: str, record: dict[str, Any] | None = None) -> str:
    """A nested run for a stage served from cache: tagged with its cache key and `cache_hit` true, holding the
    stage's record (`result.json`) as an artifact; returns its id."""
    client = MlflowClient(ref.tracking_uri)
    tags = {
        "mlflow.parentRunId": ref.parent_run_id,
        "sparse_distill.stage": stage,
        CACHE_KEY_TAG: cache_key,
        CACHE_HIT_TAG: "true",
    }
    run_id = client.create_run(ref.experiment_id, run_name=f"{stage} (cached)", tags=tags).info.run_id
    if record is not None:
        client.log_dict(run_id, record, "result.json")
    client.set_terminated(run_id, status="FINISHED")
    return run_id


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset input of a run: what MLflow's Dataset column shows. `digest` is our file fingerprint
    (`run_store.file_fingerprint` hashed: path, size, mtime), `rows` its row count (None when unknown)."""

    name: str
    context: str
    source: str
    digest: str
    rows: int | None = None


def log_datasets(tracking_uri: str, run_id: str, datasets: list[DatasetRecord]) -> None:
    """Log the datasets as inputs of the run, from their metadata alone (nothing is read or uploaded)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    class _Dataset(MetaDataset):
        # MetaDataset has no profile; the row count goes there, where the MLflow UI shows it.
        def __init__(self, record: DatasetRecord) -> None:
            super().__init__(LocalArtifactDatasetSource(record.source), name=record.name, digest=record.digest)
            self._rows = record.rows

        @property
        def profile(self) -> dict[str, Any] | None:
            return None if self._rows is None else {"num_rows": self._rows}

        def to_dict(self) -> dict[str, str]:
            config = super().to_dict()
            if self.profile is not None:
                config["profile"] = json.dumps(self.profile)
            return config

    inputs = [
        DatasetInput(_Dataset(d)._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, d.context)])
        for d in datasets
    ]
    MlflowClient(tracking_uri).log_inputs(run_id, datasets=inputs)


def git_source(path: str | Path) -> dict[str, str]:
    """MLflow's source tags for the code in `path`: the git commit (and whether the tree has uncommitted changes);
    empty outside a git repository or without git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError) as e:
        logger.debug("%s: no git commit to record (%s)", path, e)
        return {}
    return {"mlflow.source.git.commit": commit, "sparse_distill.git_dirty": str(dirty).lower()}


def set_description(tracking_uri: str, run_id: str, markdown: str) -> None:
    """The run's description in the MLflow UI (the `mlflow.note.content` tag)."""
    MlflowClient(tracking_uri).set_tag(run_id, "mlflow.note.content", markdown)
