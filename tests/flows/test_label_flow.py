"""The labelling flow: Dask equals one thread, a poison shard fails alone, kill -9 then resume, label-status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_distill.config import LabelJob, TrackingConfig
from sparse_distill.labelling import file_checksum

pytestmark = pytest.mark.usefixtures("prefect_harness")

ROOT = Path(__file__).resolve().parents[2]


def _corpus(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    words = np.array("the film was great awful boring moving plot actors story dull superb and but really".split())
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 30)))) for _ in range(n)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=500)
    return path


def _job(teacher, corpus, out, **label) -> LabelJob:
    return LabelJob(
        teacher=str(teacher),
        corpus=[str(corpus)],
        out=str(out),
        max_length=32,
        label={"shard_size": 250, "batch_size": 32, **label},
    )


def _read(out: Path) -> tuple[list[str], np.ndarray]:
    tables = [pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet"))]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    probs = np.concatenate([np.array(t.column("probs").to_pylist()) for t in tables])
    return ids, probs


def _flow(job: LabelJob):
    from flows.label_flow import label_corpus_flow
    from flows.runners import make_task_runner

    return label_corpus_flow.with_options(task_runner=make_task_runner(job.label))(job=job, return_state=True)


@pytest.mark.slow
def test_dask_cluster_of_two_workers_equals_one_thread(tiny_teacher, tmp_path):
    corpus = _corpus(tmp_path / "corpus.parquet", 3000)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = _job(tiny_teacher, corpus, tmp_path / "thread").model_copy(
        update={"tracking": TrackingConfig(tracking_uri=uri, experiment="labelling")}
    )
    assert _flow(tracked).is_completed()
    state = _flow(_job(tiny_teacher, corpus, tmp_path / "dask", runner="dask", workers=2))
    assert state.is_completed()
    ids_t, probs_t = _read(tmp_path / "thread")
    ids_d, probs_d = _read(tmp_path / "dask")
    assert ids_t == ids_d == [f"corpus.parquet:{i}" for i in range(3000)]
    np.testing.assert_allclose(probs_d, probs_t, atol=1e-5)
    # Both workers took part: the records come from two processes' shards (seconds recorded for every shard).
    status = json.loads((tmp_path / "dask" / "manifest.json").read_text())
    assert all(s["status"] == "done" and s["seconds"] > 0 for s in status["shards"])
    # docs/s of every shard went to MLflow.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("labelling")
    stage = client.search_runs([exp.experiment_id], "attributes.run_name = 'label'")[0]
    assert len(client.get_metric_history(stage.info.run_id, "docs_per_s")) == 12


@pytest.mark.slow
def test_poison_shard_fails_alone_and_a_rerun_labels_only_it(tiny_teacher, tmp_path, monkeypatch):
    from sparse_distill import labelling

    corpus = _corpus(tmp_path / "corpus.parquet", 1000)
    job = _job(tiny_teacher, corpus, tmp_path / "out", runner="thread", workers=2, retries=1)
    real = labelling.label_job_shard
    calls: list[int] = []

    def poisoned(job, work, teacher_fp):
        calls.append(work["shard"]["index"])
        if work["shard"]["index"] == 2:
            raise MemoryError("injected: out of memory on shard 2")
        return real(job, work, teacher_fp)

    monkeypatch.setattr(labelling, "label_job_shard", poisoned)
    state = _flow(job)
    assert state.is_failed()
    assert "00002" in state.message or "00002" in str(state.result(raise_on_failure=False))
    assert calls.count(2) == 2  # tried, retried once, then recorded
    status = labelling.label_status(job.out)
    assert (status["done"], status["failed"], status["pending"]) == (3, 1, 0)
    assert "injected: out of memory" in status["failed_shards"][0]["error"]
    shards = Path(job.out) / "shards"
    before = {p.name: (file_checksum(p), p.stat().st_mtime_ns) for p in shards.glob("*.parquet")}

    monkeypatch.setattr(labelling, "label_job_shard", real)
    calls.clear()
    monkeypatch.setattr(labelling, "label_job_shard", lambda *a: calls.append(a[1]["shard"]["index"]) or real(*a))
    assert _flow(job).is_completed()
    assert calls == [2]
    after = {p.name: (file_checksum(p), p.stat().st_mtime_ns) for p in shards.glob("*.parquet")}
    assert {k: v for k, v in after.items() if k != "00002.parquet"} == before
    assert labelling.label_status(job.out)["failed"] == 0


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(kw.pop("home")), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=kw.pop("cwd"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_yields_every_id_once(tiny_teacher, tmp_path):
    corpus = _corpus(tmp_path / "corpus.parquet", 20_000)
    out = tmp_path / "out"
    args = ["label", "--teacher", str(tiny_teacher), "--corpus", str(corpus), "--out", str(out)]
    args += ["--shard-size", "250", "--max-length", "32", "--no-tracking"]
    proc = _cli(*args, home=tmp_path / "prefect", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "shards").glob("*.json"))) < 5 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    records = len(list((out / "shards").glob("*.json")))
    assert 5 <= records < 80, f"the kill should land mid-run ({records} of 80 shards recorded)"

    proc = _cli(*args, home=tmp_path / "prefect", cwd=tmp_path)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    ids, _ = _read(out)
    assert len(ids) == len(set(ids)) == 20_000
    assert set(ids) == {f"corpus.parquet:{i}" for i in range(20_000)}
    assert not list((out / "shards").glob(".*.tmp"))

    status = subprocess.run(
        [sys.executable, "-m", "flows.cli", "label-status", str(out), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
    )
    assert status.returncode == 0, status.stderr
    s = json.loads(status.stdout)
    assert (s["done"], s["failed"], s["pending"], s["rows_written"]) == (80, 0, 0, 20_000)
