"""The Model Registry quality gate: champion / challenger on the same test set, retention, predict by alias."""

from __future__ import annotations

import json
import logging
from dataclasses import FrozenInstanceError
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sparse_distill.config import ConfigError, PipelineConfig, TrackingConfig
from sparse_distill.data import LabelMap
from sparse_distill.mlflow_model import ensure_experiment, log_student_model, tracking_uri_default
from sparse_distill.registry import CHALLENGER, CHAMPION, RegistryError, register_student, texts_fingerprint
from sparse_distill.student import DanConfig, DanStudent, save_student
from sparse_distill.vocab import build_vocab

# 6 positive and 2 negative texts: the always-"pos" student scores 0.75, the right one 1.0.
POS_TEXTS = [f"a good film about {w}" for w in ("cats", "dogs", "trains", "ships", "kings", "rain")]
NEG_TEXTS = ["a bad film about cats", "a bad film about dogs"]
TEXTS = POS_TEXTS + NEG_TEXTS
GOLD = ["pos"] * len(POS_TEXTS) + ["neg"] * len(NEG_TEXTS)
LABELS = LabelMap.from_values(["neg", "pos"])  # class 0 = neg, class 1 = pos


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One sqlite tracking store for the module (creating its tables takes seconds); tests use distinct model names."""
    root = tmp_path_factory.mktemp("registry")
    uri = tracking_uri_default(root)
    ensure_experiment("students", uri, root / "artifacts")
    return uri, root


@pytest.fixture()
def mlflow_env(store: tuple[str, Path], monkeypatch: pytest.MonkeyPatch):
    """The module's tracking store; the process-wide tracking URI is reset before and after."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(store[1])  # anything written to ./mlruns by mistake stays in the temporary folder
    mlflow.set_tracking_uri(None)
    yield store[0]
    mlflow.set_tracking_uri(None)


@pytest.fixture()
def students(store: tuple[str, Path]) -> Path:
    """Where the hand-set students are saved (built once per module)."""
    return store[1]


def _student(root: Path, mode: str) -> Path:
    """A hand-set student: 'right' predicts the gold label, 'pos' always predicts pos."""
    vocab_dir = root / "vocab"
    vocab = build_vocab(TEXTS, size=100, ngram_max=1)
    if not vocab_dir.exists():
        vocab.save(vocab_dir)
    model = DanStudent(DanConfig(vocab_size=len(vocab.ngrams), num_classes=2, dim=2, hidden=2))
    good, bad = vocab.lookup(["good", "bad"]).tolist()
    with torch.no_grad():
        # Pooled vector: [has "good", has "bad"]; the hidden layer copies it; the output layer maps it to logits.
        model.embedding.weight.zero_()
        model.embedding.weight[good] = torch.tensor([1.0, 0.0])
        model.embedding.weight[bad] = torch.tensor([0.0, 1.0])
        model.fc1.weight.copy_(torch.eye(2) * 10)
        model.fc1.bias.zero_()
        model.fc2.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]] if mode == "right" else [[0.0, 0.0], [0.0, 0.0]]))
        model.fc2.bias.copy_(torch.tensor([0.0, 1.0] if mode == "pos" else [0.0, 0.0]))
    return save_student(model, LABELS, vocab_dir, root / f"student_{mode}")


def _log(uri: str, root: Path, mode: str) -> tuple[str, str]:
    """Log a student into a new run; returns (run id, model URI)."""
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.get_experiment_by_name("students").experiment_id).info.run_id
    model_dir = root / f"student_{mode}"
    if not model_dir.exists():
        _student(root, mode)
    return run_id, log_student_model(model_dir, run_id, tracking_uri=uri)


def _register(uri: str, root: Path, mode: str, name: str = "dan", teacher: float = 0.8, min_retention: float = 0.9):
    run_id, model_uri = _log(uri, root, mode)
    return run_id, register_student(uri, model_uri, name, run_id, TEXTS, GOLD, teacher, min_retention)


def _aliases(uri: str, name: str = "dan") -> dict[str, str]:
    # The registry returns alias versions as ints; the decision and the tags use strings.
    return {k: str(v) for k, v in mlflow.MlflowClient(uri).get_registered_model(name).aliases.items()}


def _champion(uri: str, name: str = "dan") -> str | None:
    return _aliases(uri, name).get(CHAMPION)


def test_champion_moves_only_to_a_better_version(mlflow_env: str, students: Path, caplog) -> None:
    client = mlflow.MlflowClient(mlflow_env)

    # First version: no champion, retention 0.75 / 0.8 = 0.94 >= 0.9.
    run1, first = _register(mlflow_env, students, "pos")
    assert (first.version, first.alias, first.promoted) == ("1", CHAMPION, True)
    assert first.accuracy == pytest.approx(0.75) and first.retention == pytest.approx(0.9375)
    assert first.champion_version is None and first.champion_accuracy is None
    assert "no champion" in first.reason
    assert _champion(mlflow_env) == "1"
    tags = client.get_model_version("dan", "1").tags
    assert tags["sparse_distill.decision"] == CHAMPION
    assert float(tags["sparse_distill.accuracy"]) == pytest.approx(0.75)
    assert float(tags["sparse_distill.retention"]) == pytest.approx(0.9375)
    assert tags["sparse_distill.test_fingerprint"] == texts_fingerprint(TEXTS, GOLD)
    assert tags["sparse_distill.reason"] == first.reason
    assert client.get_model_version("dan", "1").run_id == run1
    run_tags = client.get_run(run1).data.tags
    assert run_tags["sparse_distill.registry.decision"] == CHAMPION
    assert run_tags["sparse_distill.registry.version"] == "1"
    assert run_tags["sparse_distill.registry.reason"] == first.reason
    with pytest.raises(FrozenInstanceError):
        first.alias = CHALLENGER  # type: ignore[misc]

    # Better: takes champion.
    _, better = _register(mlflow_env, students, "right")
    assert (better.version, better.alias, better.promoted) == ("2", CHAMPION, True)
    assert (better.champion_version, better.champion_accuracy) == ("1", pytest.approx(0.75))
    assert "beats champion v1 (0.750)" in better.reason
    assert _champion(mlflow_env) == "2"

    # Worse: challenger, champion unchanged, the reason names both accuracies.
    caplog.set_level(logging.INFO, logger="sparse_distill.registry")
    run3, worse = _register(mlflow_env, students, "pos")
    assert (worse.version, worse.alias, worse.promoted) == ("3", CHALLENGER, False)
    assert worse.reason == "accuracy 0.750 on test does not beat champion v2 (1.000)"
    assert _champion(mlflow_env) == "2"
    assert _aliases(mlflow_env)[CHALLENGER] == "3"
    assert client.get_model_version("dan", "3").tags["sparse_distill.decision"] == CHALLENGER
    assert client.get_run(run3).data.tags["sparse_distill.registry.reason"] == worse.reason
    assert worse.reason in caplog.text

    # A tie does not promote.
    _, tie = _register(mlflow_env, students, "right")
    assert (tie.alias, tie.promoted, tie.champion_accuracy) == (CHALLENGER, False, pytest.approx(1.0))
    assert "does not beat champion v2 (1.000)" in tie.reason
    assert _champion(mlflow_env) == "2"
    assert _aliases(mlflow_env)[CHALLENGER] == "4"


def test_low_retention_blocks_promotion_without_a_champion(mlflow_env: str, students: Path) -> None:
    _, decision = _register(mlflow_env, students, "pos", name="strict", teacher=1.0, min_retention=0.95)
    assert (decision.alias, decision.promoted) == (CHALLENGER, False)
    assert decision.reason == "retention 0.750 is below the required 0.950"
    assert _champion(mlflow_env, "strict") is None
    assert _aliases(mlflow_env, "strict") == {CHALLENGER: "1"}


def test_registration_failure_names_the_model(mlflow_env: str, students: Path) -> None:
    run_id, _ = _log(mlflow_env, students, "pos")
    with pytest.raises(RegistryError, match="'broken'"):
        register_student(mlflow_env, "models:/m-doesnotexist", "broken", run_id, TEXTS, GOLD, 0.8, 0.9)
    with pytest.raises(ValueError, match="teacher accuracy"):
        register_student(mlflow_env, "models:/m-x", "broken", run_id, TEXTS, GOLD, 0.0, 0.9)


def test_predict_by_champion_alias(
    tmp_path: Path, mlflow_env: str, students: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cli import main

    _register(mlflow_env, students, "right", name="shipped")
    mlflow.set_tracking_uri(None)  # only the environment variable tells the CLI where the registry is
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_env)
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["predict", "--model", "models:/shipped@champion", "--input", str(tmp_path / "in.txt"), "--output", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == GOLD


def test_publish_wiring_registers_on_the_test_split(tmp_path: Path, mlflow_env: str, students: Path) -> None:
    """publishing.register_best: the test split's texts and labels, the teacher's test accuracy, a summary dict."""
    from sparse_distill.publishing import register_best
    from sparse_distill.tracking import TrackingRef

    for split in ("train", "dev", "test"):
        order = slice(None, None, -1 if split == "dev" else 1)  # dev differs from test: the gate must use test
        pq.write_table(pa.table({"text": TEXTS[order], "label": GOLD[order]}), tmp_path / f"{split}.parquet")
    config = PipelineConfig.model_validate(
        {
            "data": {"data_dir": str(tmp_path), "train": "train.parquet", "dev": "dev.parquet", "test": "test.parquet"},
            "teacher": {"model": "unused"},
            "tracking": {"tracking_uri": mlflow_env, "registered_model": "wired", "min_retention": 0.5},
        }
    )
    run_id, model_uri = _log(mlflow_env, students, "pos")
    client = mlflow.MlflowClient(mlflow_env)
    tracking = TrackingRef(mlflow_env, client.get_run(run_id).info.experiment_id, run_id)
    evaluation = {"metrics": {"teacher": {"dev": {"accuracy": 0.5}, "test": {"accuracy": 1.0}}}}
    out = register_best(config, tracking, model_uri, evaluation, "test", logging.getLogger("test"))
    assert out["alias"] == CHAMPION and out["version"] == "1" and out["model_uri"] == "models:/wired/1"
    assert out["retention"] == pytest.approx(0.75)  # the teacher's test accuracy, not dev
    assert out["test_fingerprint"] == texts_fingerprint(TEXTS, GOLD)
    json.dumps(out)  # goes into summary.json


def test_tracking_config_fields() -> None:
    assert TrackingConfig().registered_model is None
    assert TrackingConfig().min_retention == 0.9
    for bad in ({"min_retention": 0}, {"min_retention": 1.6}, {"registered_model": ""}, {"registerd_model": "x"}):
        with pytest.raises(ValueError):
            TrackingConfig.model_validate(bad)
    assert issubclass(ConfigError, ValueError)
