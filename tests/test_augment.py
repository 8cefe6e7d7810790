"""Augmentation (EDA, n-gram sampling), the transfer set (make_transfer_set, word dropout, text mixing) and the
word-shuffling probe behind WOS."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from sparse_distill.augment import (
    augment_texts,
    eda,
    make_transfer_copies,
    mix_texts,
    nearest_words,
    neighbour_replace,
    ngram_sample,
    replaceable_words,
    shuffle_words,
    word_dropout,
    word_order_sensitivity,
)

TEXT = "the plot was dull but the actors were really quite wonderful tonight"


def make_transfer_set(*args, **kwargs) -> list[str]:
    """The texts of `make_transfer_copies` (most tests here look at the texts alone)."""
    return make_transfer_copies(*args, **kwargs).texts


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


# --- the transfer set -------------------------------------------------------------------------------------------------

SOURCES = [
    TEXT,
    "a dull and tedious story",
    "great fun from start to finish",
    "one",
    "the actors carry a messy plot",
    "brilliant",
    "really quite boring but charming at times",
]


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(w in it for w in short)


def _is_span(span: list[str], words: list[str]) -> bool:
    return any(words[i : i + len(span)] == span for i in range(len(words) - len(span) + 1))


def _is_mix(out: list[str], first: list[str], second: list[str]) -> bool:
    # A leading span of one text (at least one word) then a trailing span of another (at least one word).
    return any(
        out[:i] == first[:i] and out[i:] == second[len(second) - (len(out) - i) :] and 0 < len(out) - i <= len(second)
        for i in range(1, len(first) + 1)
    )


@pytest.mark.parametrize("size", [1, 5, 7, 23])
def test_transfer_set_has_exactly_size_texts(size):
    out = make_transfer_set(SOURCES, size, seed=1)
    assert len(out) == size and all(isinstance(t, str) and t.strip() for t in out)


def test_transfer_set_is_deterministic_per_seed_and_differs_across_seeds():
    a = make_transfer_set(SOURCES, 30, seed=3)
    assert a == make_transfer_set(SOURCES, 30, seed=3)
    assert a != make_transfer_set(SOURCES, 30, seed=4)


def test_transfer_set_methods_each_make_texts_from_the_train_words():
    split = [t.split() for t in SOURCES]
    vocab = {w for ws in split for w in ws}
    n = 60
    mix = [t.split() for t in make_transfer_set(SOURCES, n, ["mix"], seed=5)]
    assert all(any(_is_mix(o, a, b) for a in split for b in split) for o in mix), mix
    assert any(o not in split for o in mix)  # really mixed, not copies
    drop = [t.split() for t in make_transfer_set(SOURCES, n, ["dropout"], seed=5, dropout=0.3)]
    assert all(o and any(_is_subsequence(o, s) for s in split) for o in drop), drop
    assert any(o not in split for o in drop)  # some words were dropped
    spans = [t.split() for t in make_transfer_set(SOURCES, n, ["ngram"], seed=5)]
    assert all(o and any(_is_span(o, s) for s in split) for o in spans), spans
    assert any(o not in split for o in spans)
    edits = [t.split() for t in make_transfer_set(SOURCES, n, ["eda"], seed=5, alpha=0.1)]
    assert all(set(o) <= vocab for o in edits)  # replacements come from the train texts' words
    assert all(any(len(s) - 1 <= len(o) <= len(s) for s in split) for o in edits)
    assert any(o not in split for o in edits)


def test_transfer_set_mixes_methods_when_given_several():
    split = [t.split() for t in SOURCES]
    out = [t.split() for t in make_transfer_set(SOURCES, 80, ["ngram", "mix"], seed=2)]
    spans = [o for o in out if any(_is_span(o, s) for s in split)]
    assert spans and len(spans) < len(out)  # some spans, some mixes that are no span of any text
    assert all(any(_is_mix(o, a, b) for a in split for b in split) for o in out if o not in spans)


def test_transfer_set_cycles_through_every_source_before_repeating():
    sources = [*SOURCES, "   ", ""]  # blank texts are never sources
    out = make_transfer_set(sources, 2 * len(SOURCES), ["dropout"], seed=8, dropout=0.0)  # dropout 0: the text itself
    first, second = out[: len(SOURCES)], out[len(SOURCES) :]
    assert sorted(first) == sorted(SOURCES) and sorted(second) == sorted(SOURCES)
    assert first != SOURCES or second != SOURCES  # in a shuffled order


def test_transfer_set_empty_cases_and_errors():
    assert make_transfer_set(SOURCES, 0) == []
    assert make_transfer_set(["", "   ", "\n"], 5) == []
    assert make_transfer_set([], 5) == []
    with pytest.raises(ValueError, match="backtranslate"):
        make_transfer_set(SOURCES, 5, ["ngram", "backtranslate"])
    with pytest.raises(ValueError, match="unknown transfer methods"):
        make_transfer_set(SOURCES, 5, [])
    with pytest.raises(ValueError, match="size"):
        make_transfer_set(SOURCES, -1)


def test_word_dropout_keeps_order_and_at_least_one_word():
    rng = random.Random(0)
    words = TEXT.split()
    outs = [word_dropout(TEXT, rng, 0.5).split() for _ in range(50)]
    assert all(o and _is_subsequence(o, words) for o in outs)
    assert len({len(o) for o in outs}) > 3
    assert word_dropout(TEXT, rng, 0.0) == TEXT
    assert all(len(word_dropout(TEXT, rng, 1.0).split()) == 1 for _ in range(10))  # everything dropped: one kept
    assert word_dropout(TEXT, rng, 1.0) in words
    assert word_dropout("alone", rng, 0.99) == "alone"
    assert word_dropout("", rng) == "" and word_dropout("   ", rng) == "   "


def test_mix_texts_joins_a_head_and_a_tail():
    rng = random.Random(0)
    a, b = "one two three four".split(), "five six seven".split()
    outs = [mix_texts(" ".join(a), " ".join(b), rng).split() for _ in range(100)]
    assert all(_is_mix(o, a, b) for o in outs)
    assert {o[0] for o in outs} == {"one"} and {o[-1] for o in outs} == {"seven"}
    assert len({len(o) for o in outs}) > 3
    assert mix_texts("x", "y", rng) == "x y"  # one-word texts: both words
    assert mix_texts("", "y z", rng) == "y z" and mix_texts("y z", "", rng) == "y z"
    assert mix_texts("", "", rng) == ""


def test_mix_texts_with_a_blank_text_gives_the_other():
    assert mix_texts("   ", "y z", random.Random(0)) == "y z"


# --- neighbour replacement -------------------------------------------------------------------------------------------


def test_nearest_words_ranks_by_cosine_and_skips_unknown_queries():
    vocab = ["good", "great", "bad", "awful", "film"]
    vectors = np.array([[1, 0.1, 0], [1, 0.2, 0], [-1, 0, 0.1], [-1, 0, 0.3], [0, 0, 1]], np.float32)
    out = nearest_words(vocab, vectors, ["good", "awful", "missing"], k=2, chunk=1)
    assert out == {"good": ["great", "film"], "awful": ["bad", "film"]}  # never the word itself
    assert nearest_words(vocab, vectors, ["missing"]) == {}
    assert len(nearest_words(vocab, vectors, ["film"], k=10)["film"]) == 4  # k beyond the vocabulary


def test_replaceable_words_leave_out_the_most_frequent():
    words = [f"w{i}" for i in range(20)]
    texts = ["the film , the plot", "the actors ; the end", " ".join(words), "a film"]
    everything = {"the", "film", "plot", "actors", "end", "a", *words}  # "," and ";" have no word core
    assert replaceable_words(texts, skip_top=2) == everything - {"the", "film"}
    assert replaceable_words(texts, skip_top=0) == everything
    assert replaceable_words(texts, skip_top=100) == everything - {"the", "film"}  # at most a tenth of 26 words


def test_neighbour_replace_keeps_punctuation_and_capitals_and_changes_at_least_one_word():
    neighbours = {"good": ["great"], "film": ["movie"]}
    rng = random.Random(0)
    for _ in range(20):
        out = neighbour_replace("A good, Film here", rng, neighbours, rate=0.5)
        assert out in {"A great, Film here", "A good, Movie here", "A great, Movie here"}
    assert neighbour_replace("A great, Movie", rng, neighbours) == "A great, Movie"  # nothing to replace
    assert neighbour_replace("good film", rng, neighbours, rate=1.0) == "great movie"


def test_transfer_set_neighbour_method_brings_new_words_and_falls_back_without_neighbours():
    neighbours = {w: [f"{w}x"] for t in SOURCES for w in t.split()}
    out = make_transfer_set(SOURCES, 40, ["neighbour"], seed=3, neighbours=neighbours)
    train_words = {w for t in SOURCES for w in t.split()}
    assert len(out) == 40 and all({w for w in t.split()} - train_words for t in out)  # each has a new word
    assert out == make_transfer_set(SOURCES, 40, ["neighbour"], seed=3, neighbours=neighbours)
    plain = make_transfer_set(SOURCES, 40, ["neighbour"], seed=3)  # no neighbours: EDA instead, still 40 texts
    assert len(plain) == 40 and all(set(t.split()) <= train_words for t in plain)
