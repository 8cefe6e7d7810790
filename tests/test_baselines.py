"""Baselines: the word vocabulary, the word-level students (learning, padding masks, save/load) and TF-IDF + LR."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sparse_distill.baselines import (
    UNK_ID,
    BiLstmStudent,
    CnnStudent,
    FastTextBaseline,
    TfidfLogReg,
    WordMlpStudent,
    WordStudentPredictor,
    WordVocab,
    load_word_student,
    make_word_student,
    save_word_student,
    train_word_student,
    write_fasttext_file,
)
from sparse_distill.config import TrainConfig

GOOD = ["good", "great", "lovely", "superb", "fine"]
BAD = ["bad", "awful", "poor", "dreadful", "weak"]
NOISE = ["the", "movie", "was", "plot", "and", "actors", "it", "really", "quite", "story", "of", "scenes"]
# Small shapes so each student trains in about a second on two cores.
SMALL = {"mlp": {"dim": 16, "hidden": 32}, "bilstm": {"dim": 16, "hidden": 16}, "cnn": {"dim": 16, "filters": 16}}


def make_data(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Texts of 3-12 noise words with one or two words of the label's class inserted at random places."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(NOISE) for _ in range(rng.randint(3, 12))]
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randint(0, len(words)), rng.choice(GOOD if label else BAD))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these models are tiny, and two threads on a busy two-core machine spin and run far slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def toy():
    train_texts, train_labels = make_data(400, seed=1)
    dev_texts, dev_labels = make_data(200, seed=2)
    return train_texts, np.asarray(train_labels), dev_texts, np.asarray(dev_labels)


def one_hot(labels: np.ndarray, num_classes: int = 2) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]


def soft(labels: np.ndarray, confidence: float = 0.8) -> np.ndarray:
    """Teacher-like soft labels: `confidence` on the gold class."""
    return np.where(one_hot(labels) == 1, confidence, 1 - confidence).astype(np.float32)


CONFIG = TrainConfig(lr=1e-2, batch_size=32, epochs=6, eval_every=20, seed=0)


# --- vocabulary ------------------------------------------------------------------------------------------------------


def test_vocab_ranks_by_count_then_alphabetically_and_maps_unknown_words_to_1(tmp_path):
    # Counts: aa 3, bb 2, cc 2, dd 2, ee 1; the tie among bb/cc/dd is cut alphabetically whatever the text order.
    texts = ["dd cc bb aa", "AA, bb! cc? dd", "aa ee"]
    vocab = WordVocab.build(texts, size=3)
    assert vocab.words == ["aa", "bb", "cc"] and len(vocab) == 5
    assert WordVocab.build(list(reversed(texts)), size=3).words == ["aa", "bb", "cc"]
    ids, lengths = vocab.encode(["CC aa zzz", "", "dd bb x aa bb"], max_len=4)
    # "dd", "zzz" and "x" (one-letter words are tokens) are unknown; the third text is cut at 4.
    assert lengths.tolist() == [3, 0, 4]
    assert ids.tolist() == [[4, 2, UNK_ID, 0], [0, 0, 0, 0], [UNK_ID, 3, UNK_ID, 2]]
    assert ids.dtype == torch.long and lengths.dtype == torch.long
    vocab.save(tmp_path / "v.json")
    assert WordVocab.load(tmp_path / "v.json").words == vocab.words


def test_a_word_vocabulary_saved_before_marks_were_tokens_keeps_cutting_the_legacy_way(tmp_path):
    import json

    from sparse_distill.vocab import LEGACY_TOKEN_PATTERN, TOKEN_PATTERN

    vocab = WordVocab(["good", "!"])
    vocab.save(tmp_path / "v.json")
    assert WordVocab.load(tmp_path / "v.json").token_pattern == TOKEN_PATTERN
    assert vocab.encode_ragged(["good!"], 8)[0].tolist() == [2, 3]
    blob = json.loads((tmp_path / "v.json").read_text())
    del blob["token_pattern"]  # as written before session 49
    (tmp_path / "v.json").write_text(json.dumps(blob))
    old = WordVocab.load(tmp_path / "v.json")
    assert old.token_pattern == LEGACY_TOKEN_PATTERN and old.encode_ragged(["good! a"], 8)[0].tolist() == [2]
    blob["token_pattern"] = r"\S+"
    (tmp_path / "v.json").write_text(json.dumps(blob))
    with pytest.raises(ValueError, match="v.json: token_pattern: unknown"):
        WordVocab.load(tmp_path / "v.json")


def test_encode_of_empty_texts_has_width_one():
    vocab = WordVocab.build(["hello world"], 10)
    ids, lengths = vocab.encode(["", " \n "], max_len=8)
    assert ids.shape == (2, 1) and ids.sum() == 0 and lengths.tolist() == [0, 0]
    ids, lengths = vocab.encode([], max_len=8)
    assert ids.shape == (0, 1) and lengths.shape == (0,)


# --- students --------------------------------------------------------------------------------------------------------


def test_factory_and_param_counts():
    mlp = make_word_student("mlp", 100, 3, dim=16, hidden=64)
    assert isinstance(mlp, WordMlpStudent)
    assert mlp.param_counts() == {"total": 1600 + 1283, "sparse": 1600, "dense": 16 * 64 + 64 + 64 * 3 + 3}
    assert isinstance(make_word_student("bilstm", 100, 2), BiLstmStudent)
    cnn = make_word_student("cnn", 100, 2, dim=8, filters=4, widths=(2, 3))
    assert isinstance(cnn, CnnStudent)
    assert cnn.param_counts()["dense"] == (8 * 4 * 2 + 4) + (8 * 4 * 3 + 4) + 8 * 2 + 2
    with pytest.raises(ValueError, match="unknown student kind"):
        make_word_student("gru", 100, 2)


@pytest.mark.parametrize("kind", ["mlp", "bilstm", "cnn"])
def test_padding_does_not_change_logits(kind):
    torch.manual_seed(0)
    vocab = WordVocab.build(["good bad movie plot the actors really quite lovely awful"], 20)
    model = make_word_student(kind, len(vocab), 2, **SMALL[kind]).eval()
    # Texts shorter and longer than the CNN's widest filter (5), plus unknown words.
    texts = ["good", "the movie was good", "bad plot and unknownword actors"]
    long_text = " ".join(["the movie really quite lovely"] * 6)
    with torch.no_grad():
        for text in texts:
            alone = model(*vocab.encode([text], 64))
            ids, lengths = vocab.encode([long_text, text, "awful"], 64)
            assert ids.shape[1] > lengths[1]  # the text really is padded in the batch
            batched = model(ids, lengths)
            torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["mlp", "bilstm", "cnn"])
def test_very_short_texts_do_not_crash(kind):
    torch.manual_seed(0)
    vocab = WordVocab.build(["good bad"], 10)
    model = make_word_student(kind, len(vocab), 3, **SMALL[kind])
    predictor = WordStudentPredictor(model, vocab, max_len=16)
    for batch in (["good"], [""], ["", "good", "a"], ["good", "bad good bad good bad good"]):
        proba = predictor.predict_proba(batch)
        assert proba.shape == (len(batch), 3) and np.isfinite(proba).all()
        np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    assert predictor.predict_proba([]).shape == (0, 3)


@pytest.mark.parametrize("kind", ["mlp", "bilstm", "cnn"])
def test_students_learn_from_gold_and_from_soft_labels(toy, kind):
    train_texts, train_y, dev_texts, dev_y = toy
    vocab = WordVocab.build(train_texts, 100)
    for targets in (one_hot(train_y), soft(train_y, 0.8)):
        torch.manual_seed(0)
        model = make_word_student(kind, len(vocab), 2, **SMALL[kind])
        result, model = train_word_student(model, vocab, train_texts, targets, dev_texts, dev_y, CONFIG, max_len=32)
        predictor = WordStudentPredictor(model, vocab, max_len=32)
        dev_acc = float((predictor.predict(dev_texts) == dev_y).mean())
        assert dev_acc > 0.9, (kind, dev_acc, result.history)
        # The returned model carries the best-dev weights the result reports.
        assert dev_acc == pytest.approx(result.best_dev_accuracy)
        assert result.steps == 75  # ceil(6 epochs * 400 docs / 32)
    # Soft targets of 0.8 are learnt as such: the model is confident, but not one-hot confident, on its train set.
    confidence = predictor.predict_proba(train_texts).max(1).mean()
    assert 0.7 < confidence < 0.9, confidence


def test_training_respects_max_steps_patience_and_reports_metrics(toy):
    train_texts, train_y, dev_texts, dev_y = toy
    vocab = WordVocab.build(train_texts, 100)
    seen: list[tuple[int, dict]] = []
    model = make_word_student("mlp", len(vocab), 2, **SMALL["mlp"])
    config = CONFIG.model_copy(update={"max_steps": 7, "eval_every": 3})
    targets = one_hot(train_y)
    result, _ = train_word_student(
        model, vocab, train_texts, targets, dev_texts, dev_y, config, on_metrics=lambda s, m: seen.append((s, m))
    )
    assert result.steps == 7 and [h["step"] for h in result.history] == [3, 6, 7]
    assert any("train_loss" in m for _, m in seen) and [s for s, m in seen if "dev_accuracy" in m] == [3, 6, 7]

    # A learning rate of ~0 never improves on the first evaluation, so patience 2 stops at the third.
    config = CONFIG.model_copy(update={"lr": 1e-12, "eval_every": 1, "patience": 2})
    model = make_word_student("mlp", len(vocab), 2, **SMALL["mlp"])
    result, _ = train_word_student(model, vocab, train_texts, one_hot(train_y), dev_texts, dev_y, config)
    assert result.steps == 3 and result.best_step == 1


def test_best_dev_weights_are_restored(toy):
    train_texts, train_y, dev_texts, dev_y = toy
    vocab = WordVocab.build(train_texts, 100)
    torch.manual_seed(0)
    model = make_word_student("mlp", len(vocab), 2, **SMALL["mlp"])
    # Train on flipped labels: dev accuracy falls as training goes on, so the best weights are the early ones.
    config = CONFIG.model_copy(update={"max_steps": 40, "eval_every": 1})
    result, model = train_word_student(model, vocab, train_texts, one_hot(1 - train_y), dev_texts, dev_y, config)
    assert result.best_step < 40
    final_acc = result.history[-1]["dev_accuracy"]
    assert final_acc < result.best_dev_accuracy
    restored = float((WordStudentPredictor(model, vocab, 256).predict(dev_texts) == dev_y).mean())
    assert restored == pytest.approx(result.best_dev_accuracy)


@pytest.mark.parametrize("kind", ["mlp", "bilstm", "cnn"])
def test_save_load_round_trip(tmp_path, kind):
    torch.manual_seed(0)
    texts = ["good movie", "bad plot and awful actors", "", "unknownword"]
    vocab = WordVocab.build(texts, 10)
    kwargs = {**SMALL[kind], **({"widths": (2, 3)} if kind == "cnn" else {})}
    model = make_word_student(kind, len(vocab), 3, **kwargs)
    before = WordStudentPredictor(model, vocab, max_len=7).predict_proba(texts)
    save_word_student(model, vocab, kind, kwargs, tmp_path / "m", max_len=7)
    save_word_student(model, vocab, kind, kwargs, tmp_path / "m", max_len=7)  # overwriting works too
    loaded = load_word_student(tmp_path / "m")
    assert type(loaded.model) is type(model) and loaded.max_len == 7 and loaded.vocab.words == vocab.words
    np.testing.assert_array_equal(loaded.predict_proba(texts), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left behind
    with pytest.raises(ValueError):
        save_word_student(model, vocab, "mlp" if kind != "mlp" else "cnn", kwargs, tmp_path / "x")


# --- TF-IDF + logistic regression ------------------------------------------------------------------------------------


def test_tfidf_logreg_fit_and_fit_soft(toy, tmp_path):
    train_texts, train_y, dev_texts, dev_y = toy
    lr = TfidfLogReg(C=10.0).fit(train_texts, train_y)
    proba = lr.predict_proba(dev_texts)
    assert proba.shape == (len(dev_texts), 2)
    assert (lr.predict(dev_texts) == dev_y).mean() > 0.9
    features = len(lr.pipeline["tfidf"].vocabulary_)
    assert lr.param_count() == features + 1  # binary LR: one coefficient row and one intercept
    # Bigrams are features too (ngram_range (1, 2) by default).
    assert any(" " in f for f in lr.pipeline["tfidf"].vocabulary_)

    # The teacher disagrees with gold on 10% of the docs, unsurely; confident labels still dominate.
    rng = np.random.default_rng(0)
    targets = soft(train_y, 0.95)
    flip = rng.random(len(train_y)) < 0.1
    targets[flip] = soft(1 - train_y[flip], 0.55)
    distilled = TfidfLogReg(C=10.0).fit_soft(train_texts, targets)
    assert (distilled.predict(dev_texts) == dev_y).mean() > 0.9

    lr.save(tmp_path / "lr.joblib")
    np.testing.assert_array_equal(TfidfLogReg.load(tmp_path / "lr.joblib").predict_proba(dev_texts), proba)
    assert [p.name for p in tmp_path.iterdir()] == ["lr.joblib"]


def test_tfidf_logreg_fit_soft_learns_from_a_teacher_that_always_prefers_one_class(toy):
    # argmax is class 0 everywhere, so hard labels would hold one class; the distribution still separates them.
    train_texts, train_y, dev_texts, dev_y = toy
    targets = np.where(train_y[:, None] == 1, [0.55, 0.45], [0.95, 0.05])
    distilled = TfidfLogReg(C=10.0).fit_soft(train_texts, targets)
    p1 = distilled.predict_proba(dev_texts)[:, 1]
    assert p1[dev_y == 1].mean() > p1[dev_y == 0].mean() + 0.2
    assert 0.3 < p1[dev_y == 1].mean() < 0.6  # calibrated to the teacher's 0.45, not pushed to 1
    with pytest.raises(ValueError, match="soft_targets must have shape"):
        TfidfLogReg().fit_soft(train_texts, targets[:5])


def test_tfidf_logreg_keeps_columns_of_unseen_classes():
    texts = ["good film", "good plot", "bad film", "bad plot"] * 3
    lr = TfidfLogReg(min_df=1).fit(texts, [0, 0, 2, 2] * 3, num_classes=3)
    proba = lr.predict_proba(["good good", "bad bad"])
    assert proba.shape == (2, 3) and (proba[:, 1] == 0).all()
    assert lr.predict(["good good", "bad bad"]).tolist() == [0, 2]


# --- fastText --------------------------------------------------------------------------------------------------------


def test_fasttext_learns_the_task_and_gives_the_same_model_twice(toy):
    train_texts, train_labels, dev_texts, dev_labels = toy
    # Class index 2 never occurs in train: its column is there, at zero.
    model = FastTextBaseline.train(train_texts, train_labels.tolist(), num_classes=3)
    probs = model.predict_proba(dev_texts + ["", "GOOD\tand\nawful words"])
    assert probs.shape == (len(dev_texts) + 2, 3)
    assert np.allclose(probs.sum(1), 1, atol=1e-4) and (probs[:, 2] == 0).all()
    assert (probs[: len(dev_texts)].argmax(1) == dev_labels).mean() > 0.9
    again = FastTextBaseline.train(train_texts, train_labels.tolist(), num_classes=3).predict_proba(dev_texts)
    assert np.array_equal(again, probs[: len(dev_texts)])  # one thread and a seed: the same model
    with pytest.raises(ValueError, match="3 texts but 2 labels"):
        FastTextBaseline.train(["a", "b", "c"], [0, 1], num_classes=2)


def test_fasttext_learns_from_a_train_set_sorted_by_label():
    # fastText reads its file in order: on these rows sorted by label it scored 0.88 before the baseline shuffled
    # them (1.0 after); on IMDB's train split, sorted by label, 0.510 against 0.889.
    rng = random.Random(5)

    def rows(n: int) -> list[tuple[str, int]]:
        out = []
        for _ in range(n):
            label = rng.randrange(2)
            words = [rng.choice(NOISE) for _ in range(50)]
            for _ in range(2):
                words.insert(rng.randrange(len(words) + 1), rng.choice(GOOD if label == 0 else BAD))
            out.append((" ".join(words), label))
        return out

    train = sorted(rows(400), key=lambda r: r[1])
    test = rows(200)
    model = FastTextBaseline.train([t for t, _ in train], [y for _, y in train], num_classes=2)
    pred = model.predict_proba([t for t, _ in test]).argmax(1)
    assert (pred == np.array([y for _, y in test])).mean() > 0.95


def test_the_fasttext_file_holds_every_row_once_in_a_seeded_order(tmp_path):
    texts = [f"Text\tnumber {i}" for i in range(50)]
    labels = ["a label" if i < 25 else "b" for i in range(50)]
    write_fasttext_file(tmp_path / "one.txt", texts, labels, seed=3)
    write_fasttext_file(tmp_path / "two.txt", texts, labels, seed=3)
    lines = (tmp_path / "one.txt").read_text().splitlines()
    assert lines == (tmp_path / "two.txt").read_text().splitlines()
    assert sorted(lines) == sorted(f"__label__{'a_label' if i < 25 else 'b'} text number {i}" for i in range(50))
    assert lines != [f"__label__{'a_label' if i < 25 else 'b'} text number {i}" for i in range(50)]
    with pytest.raises(ValueError, match="bad.txt: 2 texts but 1 labels"):
        write_fasttext_file(tmp_path / "bad.txt", ["x", "y"], ["a"])
