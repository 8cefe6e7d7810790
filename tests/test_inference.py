"""The inference engine on a tiny student built here: load, predict (labels, probabilities, one text), batching,
the n-gram order limit, and a student whose weights are set by hand so the right answer is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_distill.config import StudentConfig
from sparse_distill.data import LabelMap
from sparse_distill.inference import StudentPredictor, default_threads
from sparse_distill.student import save_student
from sparse_distill.training import student_from_config
from sparse_distill.vocab import build_vocab

TEXTS = ["a great film", "a dull film", "great great", "", "not a word we know", "dull and great"]


def _save(tmp_path: Path, model, vocab, labels: list[str]) -> Path:
    vocab.save(tmp_path / "vocab")
    return save_student(model, LabelMap.from_values(labels), tmp_path / "vocab", tmp_path / "model")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    vocab = build_vocab(TEXTS, 30, 2)
    torch.manual_seed(0)
    model = student_from_config(len(vocab), 3, StudentConfig(dim=8, hidden=8, init_std=1.0))
    return _save(tmp_path, model, vocab, ["neg", "neutral", "pos"])


@pytest.fixture
def sentiment_dir(tmp_path: Path) -> Path:
    """A student that says pos iff the text has more `great` than `dull` (sum pooling, weights set by hand)."""
    vocab = build_vocab(["great dull film"], 10, 1)
    model = student_from_config(len(vocab), 2, StudentConfig(dim=2, hidden=2, pooling="sum", members=1))
    great, dull = (int(i) for i in vocab.lookup(["great", "dull"]))
    with torch.no_grad():
        model.embedding.weight.zero_()
        model.embedding.weight[great] = torch.tensor([1.0, 0.0])
        model.embedding.weight[dull] = torch.tensor([0.0, 1.0])
        model.fc1.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        model.fc1.bias.zero_()
        model.fc2.weight.copy_(torch.tensor([[0.0, 4.0], [4.0, 0.0]]))  # class 0 = neg, class 1 = pos
        model.fc2.bias.zero_()
    return _save(tmp_path, model, vocab, ["neg", "pos"])


def test_hand_set_student_gives_the_known_answers(sentiment_dir):
    predictor = StudentPredictor.load(sentiment_dir)
    assert predictor.labels == ["neg", "pos"] and predictor.num_classes == 2
    texts = ["great film", "dull film", "great great dull", "dull dull great film", "film"]
    assert predictor.predict(texts) == ["pos", "neg", "pos", "neg", "neg"]
    probs = predictor.predict_proba(texts)
    # "great film": hidden (1, 0) -> logits (0, 4); "film": all zeros -> a tie
    np.testing.assert_allclose(probs[0], [1 / (1 + np.exp(4)), 1 / (1 + np.exp(-4))], rtol=1e-5)
    np.testing.assert_allclose(probs[4], [0.5, 0.5])


def test_load_predict_shapes_and_probabilities(model_dir):
    predictor = StudentPredictor.load(model_dir)
    logits = predictor.predict_logits(TEXTS)
    probs = predictor.predict_proba(TEXTS)
    assert logits.shape == probs.shape == (len(TEXTS), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert (probs > 0).all()
    # argmax of logits, as label values
    assert predictor.predict(TEXTS) == [predictor.labels[i] for i in logits.argmax(axis=1)]
    assert predictor.predict_proba([]).shape == (0, 3) and predictor.predict([]) == []


def test_batching_and_one_text_at_a_time_agree(model_dir):
    predictor = StudentPredictor.load(model_dir)
    whole = predictor.predict_proba(TEXTS)
    for batch_size in (1, 2, 5, 1024):
        np.testing.assert_allclose(predictor.predict_proba(TEXTS, batch_size=batch_size), whole, atol=1e-6)
    for text, row in zip(TEXTS, whole, strict=True):
        np.testing.assert_allclose(predictor.predict_one(text), row, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        predictor.predict_logits(TEXTS, batch_size=0)


def test_threads_agree_with_one_thread_and_close_is_reusable(model_dir):
    torch_threads = torch.get_num_threads()
    try:
        one = StudentPredictor.load(model_dir).predict_proba(TEXTS * 5, batch_size=4)
        many = StudentPredictor.load(model_dir, threads=3)
        np.testing.assert_allclose(many.predict_proba(TEXTS * 5, batch_size=4), one, atol=1e-6)
        many.close()
        np.testing.assert_allclose(many.predict_proba(TEXTS * 5, batch_size=4), one, atol=1e-6)
        many.close()
    finally:
        torch.set_num_threads(torch_threads)  # threads > 1 sets PyTorch's process-wide pool to one thread
    assert default_threads() >= 1


def test_max_order_one_ignores_the_bigrams(model_dir):
    full = StudentPredictor.load(model_dir)
    unigrams = StudentPredictor.load(model_dir, max_order=1)
    # one word: no bigram to drop, the same logits
    np.testing.assert_allclose(unigrams.predict_logits(["great"]), full.predict_logits(["great"]), atol=1e-6)
    # "great film" is a kept bigram: dropping it changes the pooled vector
    assert "great film" in full.vocab.ngrams
    assert not np.allclose(unigrams.predict_logits(["great film"]), full.predict_logits(["great film"]))


def test_loading_a_folder_that_is_not_a_model_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises((FileNotFoundError, ValueError)):
        StudentPredictor.load(tmp_path / "empty")
