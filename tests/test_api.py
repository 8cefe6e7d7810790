"""The public API: `from sparse_distill import load_student` from a folder, `runs:/` and `models:/NAME@alias`;
predictions for lists, Series and DataFrames; explanations; `import sparse_distill` stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import sparse_distill
from sparse_distill.data import LabelMap
from sparse_distill.inference import StudentPredictor
from sparse_distill.student import DanConfig, DanStudent, save_student
from sparse_distill.vocab import build_vocab

TEXTS = [f"the film was {a} and {b}" for a in ("great", "boring", "charming", "awful") for b in ("odd", "moving")]


def _folder(tmp_path: Path, labels: list) -> Path:
    vocab = build_vocab(TEXTS, size=100, ngram_max=2)
    vocab.save(tmp_path / "vocab")
    torch.manual_seed(0)
    model = DanStudent(DanConfig(vocab_size=len(vocab.ngrams), num_classes=len(labels), dim=8, hidden=8, init_std=1.0))
    return save_student(model, LabelMap.from_values(labels), tmp_path / "vocab", tmp_path / "student")


@pytest.fixture
def folder(tmp_path) -> Path:
    return _folder(tmp_path, ["neg", "pos"])


def test_the_public_names_load_lazily():
    assert {"load_student", "Student", "Prediction", "Explanation", "explain_text", "top_ngrams"} <= set(
        sparse_distill.__all__
    )
    assert sparse_distill.load_student.__module__ == "sparse_distill.api"
    assert "load_student" in dir(sparse_distill)
    with pytest.raises(AttributeError):
        sparse_distill.nothing_here  # noqa: B018


@pytest.mark.slow
def test_importing_the_package_and_predicting_from_a_folder_stay_light(folder):
    # A fresh interpreter: which heavy modules `import sparse_distill` and a folder prediction pull in.
    code = (
        "import sys, sparse_distill\n"
        "light = not any(m in sys.modules for m in ('torch', 'mlflow', 'prefect', 'pandas'))\n"
        f"s = sparse_distill.load_student({str(folder)!r}); s.predict(['a great film']); s.explain('great film')\n"
        "print(light, [m for m in ('mlflow', 'prefect', 'torch._dynamo', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "[]"], out


def test_predict_list_series_dataframe(folder):
    student = sparse_distill.load_student(folder)
    reference = StudentPredictor.load(folder)
    texts = TEXTS[:5]
    assert student.labels == ["neg", "pos"] and "neg" in repr(student)
    assert student.predict(texts) == reference.predict(texts)
    frame = pd.DataFrame({"id": range(5), "text": texts}, index=list("abcde"))
    series = student.predict(frame["text"])
    assert isinstance(series, pd.Series) and list(series.index) == list("abcde")
    assert series.tolist() == reference.predict(texts)
    probs = student.predict_proba(frame)
    assert list(probs.columns) == ["neg", "pos"] and list(probs.index) == list("abcde")
    np.testing.assert_allclose(probs.to_numpy(), reference.predict_proba(texts), atol=1e-6)
    assert student.predict(np.array(texts)) == reference.predict(texts)
    assert student.predict(frame[["text"]].rename(columns={"text": "review"})).tolist() == reference.predict(texts)
    one = student.predict_one(texts[0])
    assert one.label == reference.predict(texts[:1])[0]
    assert one.probability == pytest.approx(max(one.probabilities.values()))
    with pytest.raises(TypeError, match="predict_one"):
        student.predict("one text")
    with pytest.raises(TypeError, match="text 1"):
        student.predict(["ok", None])
    with pytest.raises(ValueError, match="'text' column"):
        student.predict_proba(frame.assign(other=1).drop(columns="text").assign(more=2))


def test_integer_labels_come_back_as_integers(tmp_path):
    student = sparse_distill.load_student(_folder(tmp_path, [0, 1, 2]))
    assert set(student.predict(TEXTS)) <= {0, 1, 2}
    assert list(student.predict_proba(TEXTS).columns) == [0, 1, 2]
    assert isinstance(student.predict_one(TEXTS[0]).label, int)


def test_explain_and_top_ngrams(folder):
    student = sparse_distill.load_student(folder)
    explanation = student.explain("the film was great and moving", top=3)
    assert isinstance(explanation, sparse_distill.Explanation) and len(explanation.ngrams) == 3
    assert explanation.label == student.predict(["the film was great and moving"])[0]
    top = student.top_ngrams(4)
    assert set(top) == {"neg", "pos"} and all(len(v) == 4 for v in top.values())


def test_load_from_runs_and_models_uris(tmp_path, folder, monkeypatch):
    import mlflow

    from sparse_distill.mlflow_model import ensure_experiment, log_student_model, tracking_uri_default

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking_uri_default(tmp_path)
    try:
        client = mlflow.MlflowClient(uri)
        run_id = client.create_run(ensure_experiment("api", uri, tmp_path / "artifacts")).info.run_id
        log_student_model(folder, run_id, tracking_uri=uri, registered_model_name="api-student")
        client.set_registered_model_alias("api-student", "champion", "1")
        expected = StudentPredictor.load(folder).predict(TEXTS)
        for model_uri in (f"runs:/{run_id}/student", "models:/api-student@champion", "models:/api-student/1"):
            student = sparse_distill.load_student(model_uri, tracking_uri=uri)
            assert student.predict(TEXTS) == expected, model_uri
            assert student.source == model_uri
    finally:
        mlflow.set_tracking_uri(None)
