"""MLflow tracking with explicit run ids, on a sqlite store in a temporary folder: the parent run, nested stage runs,
their status when a stage fails, and the flattened params."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sparse_distill.mlflow_model import ensure_experiment, tracking_uri_default
from sparse_distill.tracking import TrackingRef, end_run, flatten, stage_run, start_parent_run


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str]:
    """One sqlite store for the module (creating one runs MLflow's migrations): (tracking URI, experiment id)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = tracking_uri_default(folder)
    return uri, ensure_experiment("tracking-test", uri, folder / "artifacts")


@pytest.fixture
def parent(store) -> TrackingRef:
    uri, experiment_id = store
    run_id = start_parent_run(uri, experiment_id, "pipeline", {"student": {"dim": 8}}, tags={"origin": "test"})
    return TrackingRef(uri, experiment_id, run_id)


def test_flatten_nests_keys_and_stringifies_values():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None"}
    assert flatten({}) == {}
    assert len(flatten({"long": "x" * 10_000})["long"]) == 6000  # MLflow's limit on a param value


def test_parent_run_holds_the_flattened_params_and_tags_and_ends(store, parent):
    client = MlflowClient(parent.tracking_uri)
    run = client.get_run(parent.parent_run_id)
    assert run.info.run_name == "pipeline" and run.info.experiment_id == parent.experiment_id
    assert run.data.params == {"student.dim": "8"}
    assert run.data.tags["origin"] == "test"
    assert run.info.status == "RUNNING"
    end_run(parent.tracking_uri, parent.parent_run_id, status="FAILED")
    assert client.get_run(parent.parent_run_id).info.status == "FAILED"


def test_stage_run_is_nested_and_logs_stepped_metrics_and_artifacts(parent, tmp_path: Path):
    (tmp_path / "curve.txt").write_text("0.5 0.7\n")
    with stage_run(parent, "distill", {"lr": 0.01, "train": {"batch_size": 64}}) as run:
        assert run is not None
        run.log_metrics(1, {"loss": 0.9, "dev_accuracy": 0.6})
        run.log_metrics(2, {"loss": 0.5})
        run.log_artifact(str(tmp_path / "curve.txt"), "plots")
    client = MlflowClient(parent.tracking_uri)
    stage = client.get_run(run.run_id)
    assert stage.info.status == "FINISHED" and stage.info.run_name == "distill"
    assert stage.data.tags["mlflow.parentRunId"] == parent.parent_run_id
    assert stage.data.tags["sparse_distill.stage"] == "distill"
    assert stage.data.params == {"lr": "0.01", "train.batch_size": "64"}
    history = client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.9), (2, 0.5)]
    assert [a.path for a in client.list_artifacts(run.run_id, "plots")] == ["plots/curve.txt"]
    children = client.search_runs(
        [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.parent_run_id}'"
    )
    assert [c.info.run_id for c in children] == [run.run_id]


def test_a_failing_stage_marks_its_run_failed_and_the_error_goes_on(parent):
    with pytest.raises(RuntimeError, match="out of memory"):
        with stage_run(parent, "label") as run:
            raise RuntimeError("out of memory")
    assert MlflowClient(parent.tracking_uri).get_run(run.run_id).info.status == "FAILED"


def test_tracking_off_yields_none_and_runs_the_body():
    ran = []
    with stage_run(None, "vocab", {"size": 10}) as run:
        ran.append(run)
    assert ran == [None]


def test_the_reference_is_small_and_picklable(parent):
    # It crosses into Prefect tasks and worker processes.
    assert pickle.loads(pickle.dumps(parent)) == parent
    with pytest.raises(AttributeError):
        parent.parent_run_id = "other"  # frozen


def test_datasets_description_and_source(parent, tmp_path):
    from sparse_distill.tracking import DatasetRecord, git_source, log_datasets, set_description

    log_datasets(
        parent.tracking_uri,
        parent.parent_run_id,
        [
            DatasetRecord("train.parquet", "train", "/data/train.parquet", "0123456789abcdef", 300),
            DatasetRecord("corpus (2 files)", "corpus", str(tmp_path / "corpus.json"), "fedcba9876543210", None),
        ],
    )
    set_description(parent.tracking_uri, parent.parent_run_id, "| model | acc |")
    run = MlflowClient(parent.tracking_uri).get_run(parent.parent_run_id)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert inputs["train.parquet"].dataset.digest == "0123456789abcdef"
    assert inputs["train.parquet"].dataset.profile == '{"num_rows": 300}'
    assert "/data/train.parquet" in inputs["train.parquet"].dataset.source
    assert [t.value for t in inputs["corpus (2 files)"].tags] == ["corpus"]
    assert inputs["corpus (2 files)"].dataset.profile in (None, "")
    assert run.data.tags["mlflow.note.content"] == "| model | acc |"

    here = git_source(Path(__file__).parent)
    assert len(here.get("mlflow.source.git.commit", "")) in (0, 40)  # a source tarball has no git
    (tmp_path / "plain").mkdir()
    assert git_source(tmp_path / "plain") == {}


def test_stage_runs_carry_their_cache_key(parent):
    from sparse_distill.tracking import log_cached_stage

    client = MlflowClient(parent.tracking_uri)
    with stage_run(parent, "distill", cache_key="sparse-distill-distill-abc") as sr:
        ran = sr.run_id
    tags = client.get_run(ran).data.tags
    assert (tags["sparse_distill.cache_key"], tags["sparse_distill.cache_hit"]) == (
        "sparse-distill-distill-abc",
        "false",
    )
    cached = log_cached_stage(parent, "vocab", "sparse-distill-vocab-def", {"size": 10})
    run = client.get_run(cached)
    assert run.info.run_name == "vocab (cached)" and run.info.status == "FINISHED"
    assert run.data.tags["sparse_distill.cache_hit"] == "true"
    assert run.data.tags["mlflow.parentRunId"] == parent.parent_run_id
    assert [a.path for a in client.list_artifacts(cached)] == ["result.json"]
