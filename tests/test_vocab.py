"""The vocabulary equals CountVectorizer's; featurisation matches a plain reference."""

from __future__ import annotations

import random

import numpy as np
import pytest
from sklearn.feature_extraction.text import CountVectorizer

from sparse_distill.vocab import (
    LEGACY_TOKEN_PATTERN,
    TOKEN_PATTERN,
    NgramVocab,
    build_vocab,
    iter_ngrams,
    select_top,
    tokenize,
)


def _docs(n: int, vocab: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)] + ["Ünïcode", "x", "it's", "don't"]
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(0, 25))) + rng.choice(["", "!", " ."]) for _ in range(n)
    ]


@pytest.mark.parametrize("size", [5, 50, 400, 5000])
@pytest.mark.parametrize("ngram_max", [1, 2, 4])
def test_sklearn_tie_rule_equals_countvectorizer_exactly(size, ngram_max):
    docs = _docs(300, 40, seed=size + ngram_max)
    cv = CountVectorizer(token_pattern=TOKEN_PATTERN, ngram_range=(1, ngram_max), max_features=size).fit(docs)
    ours = build_vocab(docs, size, ngram_max, tie_rule="sklearn")
    assert set(ours.ngrams) == set(cv.vocabulary_)


def test_alphabetical_tie_rule_keeps_everything_above_the_cut_and_is_deterministic():
    docs = _docs(300, 40, seed=7)
    cv = CountVectorizer(token_pattern=TOKEN_PATTERN, ngram_range=(1, 3)).fit(docs)
    counts = dict(zip(cv.get_feature_names_out(), np.asarray(cv.transform(docs).sum(axis=0)).ravel(), strict=True))
    ours = build_vocab(docs, 100, 3)
    cut = ours.counts[-1]
    above = {g for g, c in counts.items() if c > cut}
    assert above <= set(ours.ngrams)
    tied = sorted(g for g, c in counts.items() if c == cut)
    assert [g for g, c in zip(ours.ngrams, ours.counts, strict=True) if c == cut] == tied[: 100 - len(above)]
    assert list(ours.counts) == sorted(ours.counts, reverse=True)
    assert build_vocab(list(reversed(docs)), 100, 3).ngrams == ours.ngrams


def test_without_ties_at_the_cut_both_rules_equal_countvectorizer():
    docs = ["a aa bb", "aa bb cc", "aa bb", "aa dd"]  # counts: aa 4, bb 3, aa bb 3, ...
    cv = CountVectorizer(token_pattern=TOKEN_PATTERN, ngram_range=(1, 2), max_features=1).fit(docs)
    assert build_vocab(docs, 1, 2).ngrams == list(cv.vocabulary_) == ["aa"]


@pytest.mark.parametrize("pattern", [TOKEN_PATTERN, LEGACY_TOKEN_PATTERN])
def test_tokenisation_matches_countvectorizer_analyzer(pattern):
    analyzer = CountVectorizer(token_pattern=pattern, ngram_range=(1, 3)).build_analyzer()
    for doc in _docs(50, 10, seed=3) + ["Hello, World! It's 2026 — Ça va? a b cd"]:
        assert list(iter_ngrams(tokenize(doc, pattern), 3)) == analyzer(doc)


def test_marks_and_one_letter_words_are_tokens_and_the_legacy_pattern_drops_them():
    text = "Don't!!! I'm a 5-star fan :) — $9.99"
    assert tokenize(text) == [
        *("don", "'", "t", "!", "!", "!", "i", "'", "m", "a", "5", "-", "star", "fan", ":", ")", "—"),
        *("$", "9", ".", "99"),
    ]
    assert tokenize(text, LEGACY_TOKEN_PATTERN) == ["don", "star", "fan", "99"]
    with pytest.raises(ValueError, match="unknown token pattern"):
        tokenize(text, r"\S+")


def test_featurize_equals_per_ngram_reference():
    docs = _docs(200, 30, seed=11)
    vocab = build_vocab(docs, 300, 3)
    row = {g: i for i, g in enumerate(vocab.ngrams)}
    ids, offsets = vocab.featurize(docs)
    ends = list(offsets[1:]) + [len(ids)]
    for doc, start, end in zip(docs, offsets, ends, strict=True):
        expected = sorted(row[g] for g in iter_ngrams(tokenize(doc), 3) if g in row)
        assert sorted(ids[start:end].tolist()) == expected


def test_featurize_handles_empty_and_unknown_documents():
    vocab = build_vocab(["good film", "bad film"], 10, 2)
    ids, offsets = vocab.featurize(["", "zzz qqq", "good film"])
    assert offsets.tolist() == [0, 0, 0]
    assert sorted(vocab.ngrams[i] for i in ids) == ["film", "good", "good film"]


def test_save_load_round_trip(tmp_path):
    docs = _docs(100, 20, seed=5)
    vocab = build_vocab(docs, 150, 4)
    vocab.save(tmp_path)
    loaded = NgramVocab.load(tmp_path)
    assert loaded.ngrams == vocab.ngrams and loaded.ngram_max == 4
    for a, b in zip(vocab.featurize(docs), loaded.featurize(docs), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.lookup([vocab.ngrams[3], "not in it"]).tolist() == [3, -1]


def test_min_count_and_bad_tie_rule():
    assert [g for g, _ in select_top({"a": 1, "b": 2}, 10, min_count=2)] == ["b"]
    with pytest.raises(ValueError, match="tie_rule"):
        select_top({"a": 1}, 1, tie_rule="random")


TRICKY = [
    "Straße İstanbul cafe\u0301 x² ½ 中文 ٣٤ naïve ǅemal Ⅻ_roman a_b __ ÀÉÎ ΣΊΣΥΦΟΣ",
    "\U00011f04\U00011f05ab ﬁne ﬂow Ωmega ℃ ① ⁴² ᾈ tab\tsep new\nline dots...and-dash 'q' 12 3",
    "NUL\x00byte\x1fUNIT_sep DEL\x7fend ~tilde~ [brackets] {braces} @at #hash $100 50% a^b x|y back\\slash",
    "ALL CAPS Film film FILM 007 a1 1a _ __init__ x y z",
    "",
    "a b c",
]


def _random_code_point_texts(n: int, seed: int) -> list[str]:
    """Texts of ASCII words, marks and spaces mixed with code points drawn from all of Unicode (no surrogates)."""
    rng = random.Random(seed)

    def char() -> str:
        if rng.random() < 0.5:
            return rng.choice("ab Z!?.,'_7\t\n\x00\x1c\x85\xa0")
        cp = rng.randrange(0x110000 - 0x800)
        return chr(cp + 0x800 if cp >= 0xD800 else cp)

    return ["".join(char() for _ in range(rng.randint(0, 30))) for _ in range(n)]


@pytest.mark.parametrize("pattern", [TOKEN_PATTERN, LEGACY_TOKEN_PATTERN])
def test_vectorised_counting_equals_the_python_tokeniser_on_tricky_unicode(pattern):
    from sparse_distill.vocab import count_ngram_table, count_ngrams

    texts = TRICKY + [
        " ".join(random.Random(i).choices(["good", "bad", "film", "Film", "x", "é", "!"], k=12)) for i in range(50)
    ]
    texts += _random_code_point_texts(400, seed=1)
    table = count_ngram_table(texts, 4, pattern)
    assert dict(zip(table.column("ngram").to_pylist(), table.column("count").to_pylist(), strict=True)) == dict(
        count_ngrams(texts, 4, token_pattern=pattern)
    )


@pytest.mark.parametrize("pattern", [TOKEN_PATTERN, LEGACY_TOKEN_PATTERN])
def test_the_kernel_cuts_tokens_as_python_does_on_random_code_points(pattern):
    from sparse_distill.vocab import Subwords

    texts = TRICKY + _random_code_point_texts(600, seed=2)
    vocab = build_vocab(texts, 10**6, 3, token_pattern=pattern)
    vocab = NgramVocab(vocab.ngrams, vocab.counts, 3, subwords=Subwords(2, 4, 101), token_pattern=pattern)
    compiled = vocab.featurize(texts, engine="compiled")
    python = vocab.featurize(texts, engine="python")
    np.testing.assert_array_equal(compiled[0], python[0])
    np.testing.assert_array_equal(compiled[1], python[1])
    # Every n-gram the vocabulary counted is found again: none is lost between counting and featurising.
    assert set(compiled[0][compiled[0] < len(vocab.ngrams)].tolist()) == set(range(len(vocab.ngrams)))


@pytest.mark.parametrize("tie_rule", ["alphabetical", "sklearn"])
def test_table_selection_equals_dict_selection_with_ties(tie_rule):
    import pyarrow as pa

    from sparse_distill.vocab import select_top_table

    rng = random.Random(3)
    counts = {f"g{i:03d}": rng.randint(1, 5) for i in range(400)}
    table = pa.table({"ngram": list(counts), "count": list(counts.values())})
    for size in (1, 37, 200, 500):
        ngrams, kept = select_top_table(table, size, 2, tie_rule)
        expected = select_top(counts, size, 2, tie_rule)
        assert list(zip(ngrams, kept.tolist(), strict=True)) == expected


def test_saved_lookup_is_reused_and_rebuilt_when_the_vocabulary_changes(tmp_path):
    from sparse_distill.vocab import LOOKUP

    docs = ["a good film and a great plot", "bad film, dull plot", "good good plot"] * 5
    vocab = build_vocab(docs, 30, 3)
    vocab.save(tmp_path)
    assert (tmp_path / LOOKUP).exists()
    loaded = NgramVocab.load(tmp_path)
    for got, want in zip(loaded.featurize(docs), vocab.featurize(docs), strict=True):
        np.testing.assert_array_equal(got, want)
    # A different vocab.parquet in the folder: the stale lookup is not used, and is replaced.
    other = build_vocab(docs[1:2], 5, 2)
    import pyarrow as pa

    from sparse_distill.vocab import write_vocab

    write_vocab(pa.table({"ngram": other.ngrams, "count": other.counts}), 2, tmp_path)
    reloaded = NgramVocab.load(tmp_path)
    np.testing.assert_array_equal(reloaded.lookup(other.ngrams), np.arange(len(other)))
    assert np.all(reloaded.lookup(["great plot"]) == -1)


def test_key_table_probes_past_collisions_and_round_trips():
    from sparse_distill.vocab import KeyTable

    # 40 keys on 256 slots (load <= 1/4), many sharing a home slot (same low bits): lookups must probe past each other.
    keys = np.array([1 + 64 * i for i in range(20)] + [5 + 64 * i for i in range(20)], dtype=np.uint64)
    rows = np.arange(40, dtype=np.int64) * 3
    table = KeyTable(keys, rows)
    assert len(table.keys) == 256
    np.testing.assert_array_equal(table.get(keys), rows)
    absent = np.array([2, 1 + 64 * 20, 5 + 64 * 99, 7], dtype=np.uint64)
    np.testing.assert_array_equal(table.get(absent), [-1, -1, -1, -1])
    again = KeyTable.from_arrays(table.keys, table.rows)
    np.testing.assert_array_equal(again.get(np.concatenate([keys, absent])), np.concatenate([rows, [-1] * 4]))
    with pytest.raises(ValueError):
        KeyTable.from_arrays(table.keys[:100], table.rows[:100])


def test_featurize_gives_the_same_ids_one_text_at_a_time_and_in_a_batch():
    rng = random.Random(3)
    words = ["good", "bad", "film", "plot", "Ünïcode", "x_y", "a", "the", "İstanbul", "ΣΟΦΙΑ"]
    docs = [
        " ".join(rng.choice(words) for _ in range(rng.randint(0, 30))) + rng.choice(["", "!", "."]) for _ in range(300)
    ]
    vocab = build_vocab(docs, 150, 3)
    ids, offsets = vocab.featurize(docs)
    bounds = np.append(offsets, len(ids))
    for i, doc in enumerate(docs[:40]):
        one, off = vocab.featurize([doc])
        np.testing.assert_array_equal(one, ids[bounds[i] : bounds[i + 1]])
        assert off.tolist() == [0]


def test_a_vocabulary_that_is_not_prefix_closed_still_featurises_every_kept_ngram():
    # "good film" and "not good film" without "not" or "not good": featurising must not skip n-grams whose prefix is
    # missing. A top-|V| cut with the alphabetical rule is prefix-closed, and then it may.
    odd = NgramVocab(ngrams=["good film", "not good film", "film", "bad"], counts=[4, 3, 2, 1], ngram_max=3)
    assert not odd._prefix_closed
    ids, offsets = odd.featurize(["Not good film, bad film", "not good", ""])
    assert offsets.tolist() == [0, 5, 5]
    assert sorted(odd.ngrams[i] for i in ids) == ["bad", "film", "film", "good film", "not good film"]
    docs = _docs(300, 40, seed=5)
    assert build_vocab(docs, 500, 4)._prefix_closed


def test_featurize_on_a_prefix_closed_vocabulary_equals_the_full_reference():
    docs = _docs(400, 25, seed=21)
    vocab = build_vocab(docs, 2000, 4)
    assert vocab._prefix_closed
    row = {g: i for i, g in enumerate(vocab.ngrams)}
    for batch in (docs, docs[:20]):
        ids, offsets = vocab.featurize(batch)
        bounds = np.append(offsets, len(ids))
        for i, doc in enumerate(batch):
            expected = sorted(row[g] for g in iter_ngrams(tokenize(doc), 4) if g in row)
            assert sorted(ids[bounds[i] : bounds[i + 1]].tolist()) == expected


def test_featurize_gives_every_kept_ngram_in_order_of_length_then_position():
    # The exact order matters: pooling sums the rows in it, and training and inference must sum them alike.
    docs = TRICKY + [
        " ".join(random.Random(i).choices(["good", "Bad", "film", "x", "é", "ÉTÉ"], k=15)) for i in range(30)
    ]
    docs += _docs(100, 20, seed=4)
    vocab = build_vocab(docs, 10_000, 4)  # keeps every n-gram of these texts: each occurrence must come out
    # Counted without it (Arrow refuses lone surrogates); str.encode would refuse it too, yet its kept words count.
    docs.append("a lone \ud800surrogate ÉTÉ good film")
    assert vocab._prefix_closed
    row = {g: i for i, g in enumerate(vocab.ngrams)}
    for batch in (docs, docs[:7], docs[3:4]):
        ids, offsets = vocab.featurize(batch)
        bounds = np.append(offsets, len(ids))
        for i, doc in enumerate(batch):
            tokens = tokenize(doc)
            grams = (" ".join(tokens[j : j + n]) for n in range(1, 5) for j in range(len(tokens) - n + 1))
            expected = [row[g] for g in grams if g in row]
            assert "\ud800" in doc or len(expected) == sum(max(len(tokens) - n + 1, 0) for n in range(1, 5))
            assert ids[bounds[i] : bounds[i + 1]].tolist() == expected, doc


def test_lookup_maps_ngram_strings_to_rows():
    vocab = NgramVocab(ngrams=["good film", "film", "not good film", "bad"], counts=[4, 3, 2, 1], ngram_max=3)
    got = vocab.lookup(["film", "not good film", "good", "good film", "a b c d", "", "bad film"])
    assert got.tolist() == [1, 2, -1, 0, -1, -1, -1]


def test_max_order_keeps_only_short_ngrams_and_top_keeps_row_ids():
    docs = _docs(60, 30, 7)
    vocab = build_vocab(docs, 400, 3)
    lengths = np.array([len(g.split()) for g in vocab.ngrams])
    ids_all, _ = vocab.featurize(docs)
    for order in (1, 2, 3):
        ids, offsets = vocab.featurize(docs, max_order=order)
        assert lengths[ids].max() <= order
        # The same n-grams of length <= order as the full featurisation, document by document.
        assert sorted(ids.tolist()) == sorted(i for i in ids_all.tolist() if lengths[i] <= order)
        assert len(offsets) == len(docs)
    with pytest.raises(ValueError, match="max_order"):
        vocab.featurize(docs, max_order=0)
    small = vocab.top(50)
    assert small.ngrams == vocab.ngrams[:50]
    ids_small, _ = small.featurize(docs)
    assert sorted(ids_small.tolist()) == sorted(i for i in ids_all.tolist() if i < 50)
    assert vocab.top(10_000) is vocab


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_featurize_over_threads_equals_one_call(monkeypatch, threads):
    import sparse_distill.vocab as vocab_module
    from sparse_distill.vocab import encode_texts

    docs = _docs(700, 60, seed=5)
    docs[10:14] = ["", "", "x", ""]  # empty documents (no ids) at and around the cuts must keep their offsets
    vocab = build_vocab(docs, 400, 3)
    one = vocab._featurize_encoded(*encode_texts(docs), 3, threads=1)
    import sparse_distill.ngram_kernels as kernels

    calls: list[int] = []
    kernel = kernels.featurize_bytes

    def counted(buf, ends, *rest):
        calls.append(len(ends))
        return kernel(buf, ends, *rest)

    monkeypatch.setattr(kernels, "featurize_bytes", counted)
    monkeypatch.setattr(vocab_module, "PARALLEL_FEATURIZE_MIN_TEXTS", 50)
    many = vocab._featurize_encoded(*encode_texts(docs), 3, threads=threads)
    assert len(calls) == threads and sum(calls) == len(docs)
    np.testing.assert_array_equal(many[0], one[0])
    np.testing.assert_array_equal(many[1], one[1])
    # Too few texts per thread: one call.
    monkeypatch.setattr(vocab_module, "PARALLEL_FEATURIZE_MIN_TEXTS", 10_000)
    np.testing.assert_array_equal(vocab._featurize_encoded(*encode_texts(docs), 3, threads=threads)[0], one[0])


def test_subwords_follow_the_ngrams_as_fasttext_cuts_them_and_both_engines_agree():
    from sparse_distill.vocab import Subwords

    docs = _docs(300, 40, seed=8) + TRICKY + ["Unfunny, unfunnier: ÜBER-long naïve café x"]
    vocab = build_vocab(docs, 200, 2)
    vocab.subwords = Subwords(3, 5, 997)
    assert len(vocab) == len(vocab.ngrams) + 997
    compiled = vocab.featurize(docs, engine="compiled")
    python = vocab.featurize(docs, engine="python")
    np.testing.assert_array_equal(compiled[0], python[0])
    np.testing.assert_array_equal(compiled[1], python[1])
    # The ids of a text: its n-grams, then each word's character n-grams of "<word>" (lengths 3..5) in buckets.
    text = "Unfunny film"
    plain = NgramVocab(vocab.ngrams, vocab.counts, vocab.ngram_max).featurize([text])[0]
    ids = vocab.featurize([text])[0]
    np.testing.assert_array_equal(ids[: len(plain)], plain)
    sub = ids[len(plain) :]
    pieces = [w[c : c + n] for w in ("<unfunny>", "<film>") for n in (3, 4, 5) for c in range(len(w) - n + 1)]
    assert len(sub) == len(pieces) and sub.min() >= len(vocab.ngrams) and sub.max() < len(vocab)
    # A word the vocabulary lacks shares rows with a known word's pieces: "unfunnier" with "unfunny" ("<un", "unf" ...).
    names = vocab.row_names("unfunnier")
    assert any("<unf" in name.split("|") for name in names.values())
    assert set(vocab.featurize(["unfunnier"])[0]) & set(vocab.featurize(["unfunny"])[0])
    # Non-ASCII words are cut by characters, not bytes: "<été>" at n = 3 is "<ét", "été", "té>".
    assert len(vocab.featurize(["été"])[0]) == len(vocab.featurize(["ete"])[0])


def test_subwords_are_saved_kept_by_top_and_off_by_default(tmp_path):
    from sparse_distill.vocab import Subwords, set_subwords

    vocab = build_vocab(_docs(100, 30, seed=9), 50, 2)
    assert vocab.subwords is None and len(vocab) == len(vocab.ngrams)
    vocab.subwords = Subwords(4, 4, 50)
    vocab.save(tmp_path)
    loaded = NgramVocab.load(tmp_path)
    assert loaded.subwords == Subwords(4, 4, 50) and len(loaded) == len(vocab)
    assert loaded.top(10).subwords == Subwords(4, 4, 50) and len(loaded.top(10)) == 60
    set_subwords(tmp_path, None)
    assert NgramVocab.load(tmp_path).subwords is None
    assert Subwords.from_json({"min_n": 4, "max_n": 4, "buckets": 0}) is None  # a hand-edited 0: none, not % 0
    with pytest.raises(ValueError, match="min_n"):
        Subwords(5, 4, 10)


def test_a_legacy_vocabulary_still_featurises_with_the_pattern_it_was_counted_with(tmp_path):
    import json

    docs = ["Don't stop!", "don stop now", "I'm a fan"]
    build_vocab(docs, 100, 2, token_pattern=LEGACY_TOKEN_PATTERN).save(tmp_path)
    meta = json.loads((tmp_path / "vocab.json").read_text())
    assert meta["token_pattern"] == LEGACY_TOKEN_PATTERN
    # A vocab.json that names no pattern predates the marks: the legacy pattern.
    del meta["token_pattern"]
    (tmp_path / "vocab.json").write_text(json.dumps(meta))
    legacy = NgramVocab.load(tmp_path)
    assert legacy.token_pattern == LEGACY_TOKEN_PATTERN and "!" not in legacy.ngrams
    for engine in ("compiled", "python"):
        ids, _ = legacy.featurize(["Don't stop!"], engine=engine)
        assert sorted(legacy.ngrams[i] for i in ids) == ["don", "don stop", "stop"]
    assert legacy.top(2).token_pattern == LEGACY_TOKEN_PATTERN
    # The current pattern's vocabulary has the marks and the one-letter words.
    current = build_vocab(docs, 100, 2)
    ids, _ = current.featurize(["Don't stop!"])
    assert sorted(current.ngrams[i] for i in ids) == sorted(
        ["don", "'", "t", "stop", "!", "don '", "' t", "t stop", "stop !"]
    )
    meta["token_pattern"] = r"\S+"
    (tmp_path / "vocab.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="vocab.json: token_pattern: unknown token pattern"):
        NgramVocab.load(tmp_path)


@pytest.mark.parametrize("pattern", [TOKEN_PATTERN, LEGACY_TOKEN_PATTERN])
def test_added_words_are_cut_with_the_saved_vocabulary_pattern(tmp_path, pattern):
    import json

    from sparse_distill.vocab import add_words

    build_vocab(["good film", "bad film"], 100, 2, token_pattern=pattern).save(tmp_path)
    added = add_words(tmp_path, ["a great film!", "good"])
    vocab = NgramVocab.load(tmp_path)
    new = vocab.ngrams[-added:]
    assert new == (["!", "a", "great"] if pattern == TOKEN_PATTERN else ["great"])
    assert vocab.token_pattern == pattern
    assert json.loads((tmp_path / "vocab.json").read_text())["added_words"] == added
