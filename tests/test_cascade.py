"""The student/teacher cascade: the accuracy/speed curve, threshold choice, routing, the CLI and the MLflow model."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from flows.cli import main
from sparse_distill.cascade import (
    CascadePredictor,
    cascade_curve,
    confidence,
    default_thresholds,
    pick_threshold,
    teacher_max_length,
)
from sparse_distill.data import LabelMap
from sparse_distill.mlflow_model import ensure_experiment, log_cascade_model, tracking_uri_default
from sparse_distill.student import DanConfig, DanStudent, save_student
from sparse_distill.testing import make_tiny_teacher
from sparse_distill.vocab import build_vocab

TEXTS = [
    f"the film was {a} and the ending felt {b}"
    for a in ("great", "boring", "charming", "awful", "clever")
    for b in ("rushed", "perfect", "odd", "moving")
]
LABELS = ["neg", "pos"]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random student whose confidences spread out (init_std 1.0), labels neg/pos."""
    root = tmp_path_factory.mktemp("cascade_student")
    vocab = build_vocab(TEXTS, size=200, ngram_max=2)
    vocab.save(root / "vocab")
    torch.manual_seed(0)
    model = DanStudent(DanConfig(vocab_size=len(vocab.ngrams), num_classes=2, dim=16, hidden=32, init_std=1.0))
    return save_student(model, LabelMap.from_values(LABELS), root / "vocab", root / "student_model")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random teacher with the label_map.json the pipeline saves beside a fine-tuned teacher."""
    out = make_tiny_teacher(tmp_path_factory.mktemp("cascade_teacher") / "model", TEXTS * 5)
    LabelMap.from_values(LABELS).save(out / "label_map.json")
    return out


@pytest.fixture(scope="module")
def cascade(student_dir: Path, teacher_dir: Path) -> CascadePredictor:
    return CascadePredictor.load(student_dir, teacher_dir, threshold=0.5)


@pytest.fixture(scope="module")
def mid_threshold(cascade: CascadePredictor) -> float:
    """A threshold that keeps some texts with the student and defers others."""
    conf = confidence(cascade.student.predict_proba(TEXTS), "max_prob")
    threshold = float(np.median(conf))
    assert 0 < (conf < threshold).sum() < len(TEXTS), "the fixture student's confidences do not spread"
    return threshold


def _probs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.dirichlet(np.ones(k), size=n)


# --- confidence and the curve ---------------------------------------------------------------------------------------


def test_margin_and_max_prob() -> None:
    binary = np.array([[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]])
    np.testing.assert_allclose(confidence(binary, "max_prob"), [0.9, 0.6, 0.5])
    # With two classes the margin is 2 * max_prob - 1: the same ranking.
    np.testing.assert_allclose(confidence(binary, "margin"), [0.8, 0.2, 0.0])
    # With three the rankings can disagree: a near tie at the top is confident by max_prob, not by margin.
    three = np.array([[0.5, 0.49, 0.01], [0.4, 0.3, 0.3]])
    max_prob, margin = confidence(three, "max_prob"), confidence(three, "margin")
    assert max_prob[0] > max_prob[1]
    assert margin[0] < margin[1]
    np.testing.assert_allclose(margin, [0.01, 0.1], atol=1e-12)
    many = _probs(np.random.default_rng(0), 500, 4)
    assert (confidence(many, "margin") <= confidence(many, "max_prob") + 1e-12).all()
    with pytest.raises(ValueError, match="unknown confidence metric"):
        confidence(binary, "entropy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        confidence(np.array([0.2, 0.8]), "max_prob")


def test_curve_runs_from_student_only_to_teacher_only() -> None:
    rng = np.random.default_rng(1)
    n, k = 400, 3
    gold = rng.integers(0, k, n)
    student = _probs(rng, n, k)
    teacher = _probs(rng, n, k)
    teacher[np.arange(n)[: n * 3 // 4], gold[: n * 3 // 4]] += 5  # a teacher right on three quarters
    teacher /= teacher.sum(axis=1, keepdims=True)
    student_acc = float((student.argmax(1) == gold).mean())
    teacher_acc = float((teacher.argmax(1) == gold).mean())
    assert teacher_acc > student_acc + 0.2

    for metric in ("max_prob", "margin"):
        curve = cascade_curve(student, teacher, gold, 0.001, 0.1, metric=metric)
        first, last = curve[0], curve[-1]
        assert first["threshold"] == 0.0 and first["deferred"] == 0.0
        assert first["accuracy"] == pytest.approx(student_acc)
        assert first["docs_per_s"] == pytest.approx(1000.0)
        assert first["speedup_vs_teacher"] == pytest.approx(100.0)
        assert last["threshold"] > confidence(student, metric).max()
        assert last["deferred"] == 1.0
        assert last["accuracy"] == pytest.approx(teacher_acc)
        assert last["docs_per_s"] == pytest.approx(1 / 0.101)
        assert last["speedup_vs_teacher"] == pytest.approx(0.1 / 0.101)
        thresholds = [r["threshold"] for r in curve]
        assert thresholds == sorted(thresholds) and len(set(thresholds)) == len(thresholds) > 50
        deferred = [r["deferred"] for r in curve]
        assert deferred == sorted(deferred)
        speeds = [r["docs_per_s"] for r in curve]
        assert speeds == sorted(speeds, reverse=True)


def test_curve_rows_by_hand() -> None:
    student = np.array([[0.9, 0.1], [0.7, 0.3], [0.45, 0.55], [0.6, 0.4]])
    teacher = np.array([[0.2, 0.8], [0.1, 0.9], [0.9, 0.1], [0.3, 0.7]])
    gold = np.array([0, 1, 0, 1])  # student right on 0 only (and wrong on 1, 2, 3); teacher right on 1, 2, 3
    rows = cascade_curve(student, teacher, gold, 1.0, 3.0, thresholds=[0.65, 0.0])
    assert [r["threshold"] for r in rows] == [0.0, 0.65]
    assert rows[0]["accuracy"] == 0.25 and rows[0]["deferred"] == 0.0
    # At 0.65, docs 0 and 1 stay with the student (0 right, 1 wrong); 2 and 3 go to the teacher (both right).
    assert rows[1]["deferred"] == 0.5 and rows[1]["accuracy"] == 0.75
    assert rows[1]["docs_per_s"] == pytest.approx(1 / 2.5)
    assert rows[1]["speedup_vs_teacher"] == pytest.approx(3 / 2.5)
    assert default_thresholds(confidence(student, "max_prob"))[0] == 0.0


def test_curve_rejects_bad_shapes() -> None:
    s, t, gold = np.full((4, 2), 0.5), np.full((4, 2), 0.5), np.zeros(4, int)
    with pytest.raises(ValueError, match="teacher_probs"):
        cascade_curve(s, np.full((4, 3), 1 / 3), gold, 1, 1)
    with pytest.raises(ValueError, match="labels must have shape"):
        cascade_curve(s, t, gold[:3], 1, 1)
    with pytest.raises(ValueError, match="class indices"):
        cascade_curve(s, t, np.array([0, 1, 2, 0]), 1, 1)
    with pytest.raises(ValueError, match="student_probs"):
        cascade_curve(s[:, 0], t[:, 0], gold, 1, 1)
    with pytest.raises(ValueError, match="seconds per document"):
        cascade_curve(s, t, gold, 0.0, 1)


def test_pick_threshold_takes_the_fastest_row_reaching_the_target() -> None:
    curve = [
        {"threshold": 0.0, "deferred": 0.0, "accuracy": 0.80, "docs_per_s": 1000.0, "speedup_vs_teacher": 100.0},
        {"threshold": 0.6, "deferred": 0.2, "accuracy": 0.86, "docs_per_s": 48.0, "speedup_vs_teacher": 4.8},
        {"threshold": 0.8, "deferred": 0.5, "accuracy": 0.90, "docs_per_s": 19.6, "speedup_vs_teacher": 1.96},
        {"threshold": 1.1, "deferred": 1.0, "accuracy": 0.89, "docs_per_s": 9.9, "speedup_vs_teacher": 0.99},
    ]
    assert pick_threshold(curve, 0.75)["threshold"] == 0.0
    assert pick_threshold(curve, 0.85)["threshold"] == 0.6
    assert pick_threshold(curve, 0.89)["threshold"] == 0.8  # faster than the teacher-only row, and more accurate
    assert pick_threshold(curve, 0.95) is None
    assert pick_threshold([], 0.5) is None


# --- the predictor ------------------------------------------------------------------------------------------------


def test_teacher_sees_only_the_deferred_texts(
    cascade: CascadePredictor, mid_threshold: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    real = cascade.teacher.predict_proba

    def spy(texts: list[str], batch_size: int = 64) -> np.ndarray:
        calls.append(list(texts))
        return real(texts, batch_size)

    monkeypatch.setattr(cascade.teacher, "predict_proba", spy)
    student_probs = cascade.student.predict_proba(TEXTS)
    teacher_probs = real(TEXTS)
    for metric in ("max_prob", "margin"):
        threshold = mid_threshold if metric == "max_prob" else 2 * mid_threshold - 1  # the same cut with 2 classes
        monkeypatch.setattr(cascade, "threshold", threshold)
        monkeypatch.setattr(cascade, "metric", metric)
        calls.clear()
        probs, deferred = cascade.predict_with_route(TEXTS, batch_size=7)
        expected = confidence(student_probs, "max_prob") < mid_threshold
        np.testing.assert_array_equal(deferred, expected)
        assert calls == [[t for t, d in zip(TEXTS, expected, strict=True) if d]]
        np.testing.assert_allclose(probs[~deferred], student_probs[~deferred], atol=1e-6)
        np.testing.assert_allclose(probs[deferred], teacher_probs[deferred], atol=1e-5)
        np.testing.assert_allclose(cascade.predict_proba(TEXTS), probs, atol=1e-6)

    # Threshold 0: the teacher is never called; no texts: neither model has work.
    monkeypatch.setattr(cascade, "threshold", 0.0)
    calls.clear()
    probs, deferred = cascade.predict_with_route(TEXTS)
    assert calls == [] and not deferred.any()
    np.testing.assert_allclose(probs, student_probs, atol=1e-6)
    probs, deferred = cascade.predict_with_route([])
    assert probs.shape == (0, 2) and deferred.shape == (0,) and calls == []
    assert cascade.labels == LABELS and cascade.label_map.labels == tuple(LABELS)


def test_threshold_and_metric_are_validated(cascade: CascadePredictor) -> None:
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
            CascadePredictor(cascade.student, cascade.teacher, bad)
    with pytest.raises(ValueError, match="unknown confidence metric"):
        CascadePredictor(cascade.student, cascade.teacher, 0.5, metric="entropy")  # type: ignore[arg-type]


def test_label_mismatch_names_both_folders(student_dir: Path, teacher_dir: Path, tmp_path: Path) -> None:
    swapped = Path(shutil.copytree(teacher_dir, tmp_path / "swapped_teacher"))
    LabelMap(("pos", "neg")).save(swapped / "label_map.json")
    with pytest.raises(ValueError, match="label lists differ") as err:
        CascadePredictor.load(student_dir, swapped, threshold=0.5)
    assert str(student_dir) in str(err.value) and str(swapped) in str(err.value)

    three = make_tiny_teacher(tmp_path / "three_classes", TEXTS * 5, num_labels=3)
    with pytest.raises(ValueError, match="the teacher 3") as err:
        CascadePredictor.load(student_dir, three, threshold=0.5)
    assert str(student_dir) in str(err.value) and str(three) in str(err.value)


def test_teacher_without_label_names_is_assumed_in_order(
    student_dir: Path, teacher_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bare = Path(shutil.copytree(teacher_dir, tmp_path / "bare_teacher"))
    (bare / "label_map.json").unlink()  # config.json's id2label holds LABEL_0, LABEL_1 only
    with caplog.at_level(logging.WARNING, logger="sparse_distill.cascade"):
        predictor = CascadePredictor.load(student_dir, bare, threshold=0.5)
    assert "records no label names" in caplog.text
    assert predictor.labels == LABELS


def test_teacher_max_length_default_and_recorded(student_dir: Path, teacher_dir: Path, tmp_path: Path) -> None:
    assert teacher_max_length(teacher_dir) == 128
    recorded = Path(shutil.copytree(teacher_dir, tmp_path / "recorded_teacher"))
    (recorded / "training_info.json").write_text(json.dumps({"dev_accuracy": 0.9, "max_length": 48}))
    assert teacher_max_length(recorded) == 48
    assert CascadePredictor.load(student_dir, recorded, threshold=0.5).teacher.max_length == 48
    assert CascadePredictor.load(student_dir, recorded, threshold=0.5, max_length=16).teacher.max_length == 16


# --- command line ---------------------------------------------------------------------------------------------------


def test_cli_predict_with_cascade(
    student_dir: Path, teacher_dir: Path, mid_threshold: float, cascade: CascadePredictor, tmp_path: Path
) -> None:
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    base = ["predict", "--model", str(student_dir), "--input", str(tmp_path / "in.txt")]
    cascade_args = ["--teacher", str(teacher_dir), "--cascade-threshold", str(mid_threshold)]
    assert main([*base, *cascade_args, "--output", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    reference = CascadePredictor(cascade.student, cascade.teacher, mid_threshold)
    probs, deferred = reference.predict_with_route(TEXTS)
    assert [r["deferred"] for r in rows] == deferred.tolist()
    assert 0 < sum(r["deferred"] for r in rows) < len(TEXTS)
    assert [r["label"] for r in rows] == [LABELS[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([r["prob_pos"] for r in rows], probs[:, 1], atol=1e-5)

    out = tmp_path / "out.parquet"
    assert main([*base, *cascade_args, "--cascade-metric", "margin", "--output", str(out)]) == 0
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["row", "label", "prob_neg", "prob_pos", "deferred", "empty"]
    assert frame["deferred"].dtype == bool
    # A margin threshold of mid_threshold is a stricter cut than max_prob's: at least as many texts deferred.
    assert frame["deferred"].sum() >= deferred.sum()

    # Without the cascade options the output has no `deferred` column.
    assert main([*base, "--output", str(tmp_path / "plain.jsonl")]) == 0
    assert "deferred" not in json.loads((tmp_path / "plain.jsonl").read_text().splitlines()[0])


def test_cli_cascade_argument_errors(
    student_dir: Path, teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["predict", "--model", str(student_dir), "--input", str(tmp_path / "in.txt")]
    cases = [
        (["--cascade-threshold", "0.7"], "--cascade-threshold needs --teacher"),
        (["--teacher", str(teacher_dir)], "--teacher needs --cascade-threshold"),
        (["--teacher", str(teacher_dir), "--cascade-threshold", "1.5"], "must be in [0, 1]"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *extra])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model", "models:/m-123", "--teacher", str(teacher_dir), "--cascade-threshold", "0.7"])
    assert exit_info.value.code == 2
    assert "not an MLflow URI" in capsys.readouterr().err

    # Label lists that differ: a clean error naming both folders, exit status 2.
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    swapped = Path(shutil.copytree(teacher_dir, tmp_path / "swapped"))
    LabelMap(("pos", "neg")).save(swapped / "label_map.json")
    assert main([*base, "--teacher", str(swapped), "--cascade-threshold", "0.7"]) == 2
    err = capsys.readouterr().err
    assert "label lists differ" in err and str(swapped) in err


# --- MLflow ---------------------------------------------------------------------------------------------------------


@pytest.fixture()
def mlflow_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A sqlite tracking store under tmp_path; the process-wide tracking URI is reset afterwards."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking_uri_default(tmp_path)
    yield uri
    mlflow.set_tracking_uri(None)


def test_log_cascade_model_round_trip(
    tmp_path: Path, mlflow_env: str, student_dir: Path, teacher_dir: Path, mid_threshold: float
) -> None:
    eid = ensure_experiment("cascades", mlflow_env, tmp_path / "artifacts")
    run_id = mlflow.MlflowClient(mlflow_env).create_run(eid).info.run_id
    margin_threshold = 2 * mid_threshold - 1
    uri = log_cascade_model(student_dir, teacher_dir, margin_threshold, "margin", run_id, tracking_uri=mlflow_env)
    assert uri.startswith("models:/m-")

    loaded = mlflow.pyfunc.load_model(uri)
    assert loaded.metadata.signature.outputs.input_names() == ["label", "prob_neg", "prob_pos", "deferred"]
    out = loaded.predict(pd.DataFrame({"text": TEXTS}))
    reference = CascadePredictor.load(student_dir, teacher_dir, margin_threshold, "margin")
    probs, deferred = reference.predict_with_route(TEXTS)
    assert list(out.columns) == ["label", "prob_neg", "prob_pos", "deferred"]
    assert out["deferred"].tolist() == deferred.tolist() and 0 < deferred.sum() < len(TEXTS)
    assert out["label"].tolist() == [LABELS[i] for i in probs.argmax(1)]
    np.testing.assert_allclose(out[["prob_neg", "prob_pos"]].to_numpy(), probs, atol=1e-5)
    # The logged model carries both folders and its settings.
    raw = loaded.unwrap_python_model()
    assert raw._predictor.metric == "margin" and raw._predictor.threshold == pytest.approx(margin_threshold)
    assert raw._predictor.teacher.max_length == 128
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    assert json.loads(next(local.rglob("cascade.json")).read_text())["metric"] == "margin"
    assert list(local.rglob("student.safetensors")) and list(local.rglob("model.safetensors"))
    assert "transformers==" in (local / "requirements.txt").read_text()

    with pytest.raises(ValueError, match="threshold"):
        log_cascade_model(student_dir, teacher_dir, 2.0, "margin", run_id, tracking_uri=mlflow_env)
