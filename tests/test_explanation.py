"""Explanations: each n-gram's effect equals the model rerun without it (mean, sum, max pooling; int8 table), the
hand-set student's words explain it, and the per-label top n-grams do not depend on the chunk size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_distill.config import StudentConfig
from sparse_distill.data import LabelMap
from sparse_distill.explanation import explain_errors, explain_text, top_ngrams, write_error_explanations
from sparse_distill.inference import StudentPredictor
from sparse_distill.student import quantize_student, save_student
from sparse_distill.training import student_from_config
from sparse_distill.vocab import build_vocab

TEXTS = ["a great film", "a dull film", "great great plot", "dull and great", "the plot was dull dull dull"]
TEXT = "the great plot was dull and the film was great"


def _student(tmp_path: Path, pooling: str, labels=("neg", "neutral", "pos")) -> Path:
    vocab = build_vocab(TEXTS, 40, 2)
    vocab.save(tmp_path / "vocab")
    torch.manual_seed(1)
    model = student_from_config(len(vocab), len(labels), StudentConfig(dim=6, hidden=8, init_std=1.0, pooling=pooling))
    return save_student(model, LabelMap.from_values(list(labels)), tmp_path / "vocab", tmp_path / f"model-{pooling}")


def _rerun_without(predictor: StudentPredictor, text: str, ngram: str) -> np.ndarray:
    """The model's probabilities for `text` with every occurrence of `ngram` taken out of its bag."""
    ids, _ = predictor.vocab.featurize([text])
    row = predictor.vocab.ngrams.index(ngram)
    kept = ids[ids != row]
    with torch.inference_mode():
        logits = predictor.model(torch.from_numpy(kept), torch.zeros(1, dtype=torch.int64))
    return torch.softmax(logits, 1)[0].numpy()


@pytest.mark.parametrize("pooling", ["mean", "sum", "max"])
def test_effects_equal_the_model_rerun_without_each_ngram(tmp_path, pooling):
    predictor = StudentPredictor.load(_student(tmp_path, pooling))
    explanation = explain_text(predictor, TEXT, top=100)
    full = predictor.predict_proba([TEXT])[0]
    best = int(full.argmax())
    assert explanation.label == predictor.labels[best]
    assert explanation.probability == pytest.approx(float(full[best]), abs=1e-5)
    assert explanation.pooling == pooling and explanation.known_ngrams == len(explanation.ngrams) > 3
    effects = [g.effect for g in explanation.ngrams]
    assert sorted(effects, key=abs, reverse=True) == effects
    for g in explanation.ngrams:
        without = _rerun_without(predictor, TEXT, g.ngram)
        assert g.effect == pytest.approx(float(full[best] - without[best]), abs=1e-5), g
    counts = {g.ngram: g.count for g in explanation.ngrams}
    assert counts["great"] == 2 and counts["dull"] == 1


def test_int8_table_and_top_limit(tmp_path):
    folder = _student(tmp_path, "mean")
    predictor = StudentPredictor.load(quantize_student(folder, tmp_path / "int8", "int8"))
    explanation = explain_text(predictor, TEXT, top=3)
    assert len(explanation.ngrams) == 3 and explanation.known_ngrams > 3
    full = predictor.predict_proba([TEXT])[0]
    best = int(full.argmax())
    for g in explanation.ngrams:
        assert g.effect == pytest.approx(float(full[best] - _rerun_without(predictor, TEXT, g.ngram)[best]), abs=1e-5)
    with pytest.raises(ValueError, match="top"):
        explain_text(predictor, TEXT, top=0)


def test_unknown_text_has_no_ngrams(tmp_path):
    predictor = StudentPredictor.load(_student(tmp_path, "mean"))
    explanation = explain_text(predictor, "zzz qqq")
    assert explanation.ngrams == [] and explanation.known_ngrams == 0
    np.testing.assert_allclose(list(explanation.probabilities.values()), predictor.predict_proba(["zzz qqq"])[0])
    assert "no known n-gram" in explanation.to_markdown()
    json.dumps(explanation.to_dict())


@pytest.fixture
def sentiment(tmp_path) -> StudentPredictor:
    """pos iff more `great` than `dull` (sum pooling, weights set by hand)."""
    vocab = build_vocab(["great dull film"], 10, 1)
    vocab.save(tmp_path / "vocab")
    model = student_from_config(len(vocab), 2, StudentConfig(dim=2, hidden=2, pooling="sum", members=1))
    great, dull = (int(i) for i in vocab.lookup(["great", "dull"]))
    with torch.no_grad():
        model.embedding.weight.zero_()
        model.embedding.weight[great] = torch.tensor([1.0, 0.0])
        model.embedding.weight[dull] = torch.tensor([0.0, 1.0])
        model.fc1.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        model.fc1.bias.zero_()
        model.fc2.weight.copy_(torch.tensor([[0.0, 4.0], [4.0, 0.0]]))
        model.fc2.bias.zero_()
    return StudentPredictor.load(
        save_student(model, LabelMap.from_values(["neg", "pos"]), tmp_path / "vocab", tmp_path / "model")
    )


def test_the_hand_set_student_is_explained_by_its_words(sentiment):
    e = explain_text(sentiment, "a great film, great fun, a bit dull")
    assert e.label == "pos"
    assert e.ngrams[0].ngram == "great" and e.ngrams[0].count == 2 and e.ngrams[0].effect > 0.4
    assert {g.ngram: g.effect for g in e.ngrams}["dull"] < 0  # it argues against pos
    assert {g.ngram: g.effect for g in e.ngrams}["film"] == pytest.approx(0.0, abs=1e-6)


def test_top_ngrams_per_label_and_chunks(sentiment, tmp_path):
    top = top_ngrams(sentiment, k=2)
    assert [g for g, _ in top["pos"]][0] == "great" and [g for g, _ in top["neg"]][0] == "dull"
    assert top["pos"][0][1] > top["pos"][1][1]
    assert top_ngrams(sentiment, k=2, chunk_rows=1) == top
    predictor = StudentPredictor.load(_student(tmp_path, "mean"))
    chunked, whole = top_ngrams(predictor, k=5, chunk_rows=3), top_ngrams(predictor, k=5)
    for label in predictor.labels:  # the same n-grams; scores equal up to float rounding of other batch shapes
        assert [g for g, _ in chunked[label]] == [g for g, _ in whole[label]]
        np.testing.assert_allclose([s for _, s in chunked[label]], [s for _, s in whole[label]], atol=1e-5)
    assert len(top_ngrams(predictor, k=1000)["pos"]) == predictor.model.config.vocab_size


def test_dev_errors_are_explained_and_written(sentiment, tmp_path):
    texts = ["great film", "dull film", "great great dull", "dull dull great", "film"]
    gold = ["neg", "neg", "pos", "pos", "pos"]  # predicted: pos, neg, pos, neg, neg -> errors at rows 0, 3, 4
    report = explain_errors(sentiment, texts, gold, sample=2, top=3, seed=0)
    records = report["explained"]
    assert (report["rows"], report["errors"]) == (5, 3)
    assert len(records) == 2 and {r["row"] for r in records} <= {0, 3, 4}
    assert all(r["gold"] != r["label"] for r in records)
    paths = write_error_explanations(report, tmp_path)
    assert json.loads(paths[0].read_text()) == json.loads(json.dumps(report))
    assert "# Dev errors, explained (2 of 3 errors in 5 rows)" in paths[1].read_text()
    assert explain_errors(sentiment, ["great"], ["pos"])["explained"] == []
