"""Augmentation (EDA, n-gram sampling) and the word-shuffling probe behind WOS."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sparse_distill.augment import augment_texts, eda, ngram_sample, shuffle_words, word_order_sensitivity

TEXT = "the plot was dull but the actors were really quite wonderful tonight"


def test_eda_edits_stay_close_to_the_text():
    rng = random.Random(0)
    pool = ["zebra", "quartz"]
    words = TEXT.split()
    seen_ops = set()
    for _ in range(200):
        out = eda(TEXT, rng, pool, alpha=0.1).split()
        if len(out) < len(words):
            seen_ops.add("delete")
            assert Counter(out) <= Counter(words)  # only removals
        elif set(out) - set(words):
            seen_ops.add("replace")
            assert set(out) - set(words) <= set(pool)
            assert sum(a != b for a, b in zip(out, words, strict=True)) <= 1  # alpha 0.1 of 12 words: one word
        elif out != words:
            seen_ops.add("swap")
            assert sorted(out) == sorted(words)
    assert seen_ops == {"delete", "replace", "swap"}


def test_ngram_sample_is_a_contiguous_span():
    rng = random.Random(1)
    words = TEXT.split()
    lengths = set()
    for _ in range(100):
        span = ngram_sample(TEXT, rng).split()
        lengths.add(len(span))
        starts = [i for i in range(len(words)) if words[i : i + len(span)] == span]
        assert starts, span
    assert len(lengths) > 3  # lengths vary
    assert ngram_sample("one", rng) == "one"


def test_augment_texts_size_order_and_seed():
    texts = [TEXT, "a short one here", "x"]
    a = augment_texts(texts, 3, "eda", seed=5)
    assert len(a) == 9
    assert a == augment_texts(texts, 3, "eda", seed=5)
    assert a != augment_texts(texts, 3, "eda", seed=6)
    assert a[6:] == ["x", "x", "x"]  # a one-word text cannot be edited
    with pytest.raises(ValueError, match="per_text"):
        augment_texts(texts, 0, "ngram")
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment_texts(texts, 1, "backtranslate")  # type: ignore[arg-type]


def test_shuffle_words_permutes_each_text():
    out = shuffle_words([TEXT, "b a"], seed=3)
    assert sorted(out[0].split()) == sorted(TEXT.split())
    assert out[0] != TEXT
    assert out == shuffle_words([TEXT, "b a"], seed=3)


def test_wos_formula():
    assert word_order_sensitivity(1.0) == 0.0
    assert word_order_sensitivity(0.5) == 1.0
    assert word_order_sensitivity(0.9) == pytest.approx(0.2)
