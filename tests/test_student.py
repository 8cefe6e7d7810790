"""Save then load gives identical predictions; pooling modes; the predictor on raw text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_distill.config import StudentConfig
from sparse_distill.data import LabelMap
from sparse_distill.inference import StudentPredictor
from sparse_distill.student import load_student, save_student
from sparse_distill.training import student_from_config
from sparse_distill.vocab import build_vocab

TEXTS = ["a great and moving film", "dull, tedious and long", "", "unknownword only", "great great great"]


@pytest.mark.parametrize("pooling", ["mean", "max", "sum"])
def test_save_load_identical_predictions(tmp_path, pooling):
    vocab = build_vocab(TEXTS, 50, 3)
    vocab.save(tmp_path / "vocab")
    torch.manual_seed(0)
    model = student_from_config(len(vocab), 3, StudentConfig(dim=8, hidden=6, pooling=pooling))
    label_map = LabelMap.from_values(["neg", "neutral", "pos"])
    before = StudentPredictor(model, vocab, label_map).predict_proba(TEXTS)
    save_student(model, label_map, tmp_path / "vocab", tmp_path / "model")
    loaded = StudentPredictor.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict_proba(TEXTS), before)
    assert loaded.labels == ["neg", "neutral", "pos"]
    assert set(loaded.predict(TEXTS)) <= {"neg", "neutral", "pos"}
    assert np.allclose(before.sum(1), 1.0)


def test_overwrite_is_atomic_and_load_errors(tmp_path):
    vocab = build_vocab(TEXTS, 50, 2)
    vocab.save(tmp_path / "v")
    model = student_from_config(len(vocab), 2, StudentConfig(dim=4, hidden=4))
    lm = LabelMap.from_values([0, 1])
    save_student(model, lm, tmp_path / "v", tmp_path / "m")
    save_student(model, lm, tmp_path / "v", tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "v"]
    with pytest.raises(FileNotFoundError, match="not a student model folder"):
        load_student(tmp_path / "v")
