"""The student as an MLflow pyfunc model: logged into an existing run (from a worker thread), loaded back."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from sparse_distill.data import LabelMap
from sparse_distill.inference import StudentPredictor
from sparse_distill.mlflow_model import (
    StudentPyfunc,
    ensure_experiment,
    log_student_model,
    pip_requirements,
    tracking_uri_default,
)
from sparse_distill.student import DanConfig, DanStudent, save_student
from sparse_distill.vocab import build_vocab

TEXTS = [
    f"the film was {a} and the ending felt {b}"
    for a in ("great", "boring", "charming", "awful", "clever")
    for b in ("rushed", "perfect", "odd", "moving")
]


@pytest.fixture()
def mlflow_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A sqlite tracking store under tmp_path; the process-wide tracking URI is reset afterwards."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # anything written to ./mlruns by mistake stays in tmp_path
    uri = tracking_uri_default(tmp_path)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture()
def student_dir(tmp_path: Path) -> Path:
    vocab = build_vocab(TEXTS, size=200, ngram_max=2)
    vocab.save(tmp_path / "vocab")
    torch.manual_seed(0)
    model = DanStudent(DanConfig(vocab_size=len(vocab.ngrams), num_classes=2, dim=16, hidden=32, init_std=1.0))
    return save_student(model, LabelMap.from_values(["neg", "pos"]), tmp_path / "vocab", tmp_path / "student_model")


def test_tracking_uri_and_experiment(tmp_path: Path, mlflow_env: str) -> None:
    assert mlflow_env == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert mlflow_env.startswith("sqlite:////")
    eid = ensure_experiment("exp", mlflow_env, tmp_path / "artifacts")
    assert ensure_experiment("exp", mlflow_env, tmp_path / "artifacts") == eid
    location = mlflow.MlflowClient(mlflow_env).get_experiment(eid).artifact_location
    assert location == (tmp_path / "artifacts").resolve().as_uri()


def test_pip_requirements_pinned_without_local_suffix() -> None:
    reqs = pip_requirements()
    names = {r.split("==")[0] for r in reqs}
    assert {"mlflow", "torch", "pandas", "pyarrow", "safetensors", "numpy"} <= names
    assert all("+" not in r for r in reqs)


def test_log_and_load_matches_predictor(tmp_path: Path, mlflow_env: str, student_dir: Path) -> None:
    eid = ensure_experiment("students", mlflow_env, tmp_path / "artifacts")
    client = mlflow.MlflowClient(mlflow_env)
    run_id = client.create_run(eid).info.run_id
    client.log_param(run_id, "dim", 16)

    # From a worker thread with no active run, as a Prefect task would.
    result: dict[str, object] = {}

    def worker() -> None:
        try:
            result["uri"] = log_student_model(student_dir, run_id, tracking_uri=mlflow_env)
        except BaseException as e:  # surfaced below
            result["error"] = e

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert "error" not in result, result.get("error")
    uri = str(result["uri"])
    assert uri.startswith("models:/m-")
    assert mlflow.active_run() is None
    assert client.get_run(run_id).info.status == "RUNNING"  # the run is not ended by logging

    loaded = mlflow.pyfunc.load_model(uri)
    signature = loaded.metadata.signature
    assert signature is not None
    assert signature.inputs.input_names() == ["text"]
    assert signature.outputs.input_names() == ["label", "prob_neg", "prob_pos"]

    reference = StudentPredictor.load(student_dir)
    out = loaded.predict(pd.DataFrame({"text": TEXTS}))
    assert list(out.columns) == ["label", "prob_neg", "prob_pos"]
    assert out["label"].tolist() == reference.predict(TEXTS)
    np.testing.assert_allclose(out[["prob_neg", "prob_pos"]].to_numpy(), reference.predict_proba(TEXTS), atol=1e-6)
    assert set(out["label"]) <= {"neg", "pos"}

    # The same model through the run URI; weights are stored as safetensors.
    by_run = mlflow.pyfunc.load_model(f"runs:/{run_id}/student")
    pd.testing.assert_frame_equal(by_run.predict(pd.DataFrame({"text": TEXTS[:3]})), out.iloc[:3])
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    assert list(local.rglob("student.safetensors"))
    assert (local / "requirements.txt").read_text().count("==") >= 6

    # The raw python model takes a Series, a list or a numpy array of str too.
    raw = loaded.unwrap_python_model()
    assert isinstance(raw, StudentPyfunc)
    for form in (pd.Series(TEXTS[:4]), TEXTS[:4], np.array(TEXTS[:4]), pd.DataFrame({"only": TEXTS[:4]})):
        pd.testing.assert_frame_equal(raw.predict(None, form), out.iloc[:4])
    for bad in (
        [1, 2],
        ["ok", None],
        pd.DataFrame({"text": ["a", float("nan")]}),
        None,
        pd.DataFrame({"a": [], "b": []}),
    ):
        with pytest.raises(ValueError):
            raw.predict(None, bad)


@pytest.mark.slow
def test_loads_without_sparse_distill_installed(tmp_path: Path, mlflow_env: str, student_dir: Path) -> None:
    """code_paths ship the package: a fresh interpreter outside the repo loads and runs the model."""
    eid = ensure_experiment("students", mlflow_env, tmp_path / "artifacts")
    run_id = mlflow.MlflowClient(mlflow_env).create_run(eid).info.run_id
    uri = log_student_model(student_dir, run_id, tracking_uri=mlflow_env, artifact_path="dan")
    repo = str(Path(__file__).resolve().parents[1])
    # Hide an editable install of the repo (its finder and path entries) so only the logged code can be imported.
    script = (
        "import importlib.util, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')\n"
        "                    and 'editable' not in getattr(f, '__name__', '')]\n"
        f"sys.path[:] = [p for p in sys.path if p.rstrip('/') != {repo!r}]\n"
        "if importlib.util.find_spec('sparse_distill') is not None:\n"
        "    print('SKIP'); sys.exit(0)\n"
        "import mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model({uri!r})\n"
        "print(m.predict(pd.DataFrame({'text': ['the film was great']}))['label'].iloc[0])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = mlflow_env
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if done.stdout.strip() == "SKIP":
        pytest.skip("sparse_distill is installed non-editable: cannot hide it from a subprocess")
    assert done.stdout.strip().splitlines()[-1] == StudentPredictor.load(student_dir).predict(["the film was great"])[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_rest_requests(tmp_path: Path, mlflow_env: str, student_dir: Path) -> None:
    """`mlflow models serve --env-manager local` on a loopback port predicts like the library."""
    import json
    import time
    import urllib.error
    import urllib.request

    eid = ensure_experiment("students", mlflow_env, tmp_path / "artifacts")
    run_id = mlflow.MlflowClient(mlflow_env).create_run(eid).info.run_id
    uri = log_student_model(student_dir, run_id, tracking_uri=mlflow_env)
    port = _free_port()
    # The server execs `uvicorn` by name: the environment's bin folder must be on PATH (as in an activated venv).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_env, "PATH": path}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
    server = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"mlflow models serve exited: {server.stdout.read()}"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping within 120 s"
            time.sleep(0.5)

        def post(payload: dict) -> tuple[int, dict]:
            request = urllib.request.Request(
                f"{base}/invocations", json.dumps(payload).encode(), {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        status, body = post({"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}})
        assert status == 200, body
        reference = StudentPredictor.load(student_dir)
        rows = body["predictions"]
        assert [r["label"] for r in rows] == reference.predict(TEXTS)
        got = np.array([[r["prob_neg"], r["prob_pos"]] for r in rows])
        np.testing.assert_allclose(got, reference.predict_proba(TEXTS), atol=1e-6)
        status, body = post({"inputs": {"text": TEXTS[:2]}})
        assert status == 200 and len(body["predictions"]) == 2
        status, body = post({"dataframe_split": {"columns": ["review"], "data": [[1]]}})
        assert 400 <= status < 500, body
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
