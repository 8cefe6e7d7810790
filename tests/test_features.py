"""Featurise once: ids stored beside the soft labels equal featurising the texts, shards are kept or redone by what
they were made from, and streaming the stored ids gives the very batches that streaming the texts gives."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sparse_distill.config import DataConfig, PipelineConfig, TeacherConfig
from sparse_distill.data import DataError
from sparse_distill.features import featurize_labels, iter_featurized
from sparse_distill.pipeline import gold_targets, load_task_data
from sparse_distill.soft_labels import SHARDS, read_soft_labels, write_soft_labels
from sparse_distill.testing import make_labelled_shards
from sparse_distill.training import DocIds, InMemoryBatches, SoftLabelStream
from sparse_distill.vocab import NgramVocab, Subwords, build_vocab, set_subwords

TEXTS = [
    f"the film number {i} was {'great' if i % 3 else 'dull and slow'} {'' if i % 4 else 'ça va'}" for i in range(23)
]
TEXTS[5] = "zy ~"  # a document with no kept n-gram: its n-grams are seen once and sort after the cut of 40


def _labels(tmp_path, name="labels", shard_size=5, seed=0):
    return make_labelled_shards(tmp_path / name, TEXTS, shard_size, seed=seed)


def _vocab(tmp_path, size=40, name="vocab"):
    build_vocab(TEXTS, size, 2).save(tmp_path / name)
    return tmp_path / name


def test_stored_ids_equal_featurising_the_texts(tmp_path):
    labels, vocab_dir = _labels(tmp_path), _vocab(tmp_path)
    out = featurize_labels(labels, vocab_dir, tmp_path / "features")
    vocab = NgramVocab.load(vocab_dir)
    shards = list(iter_featurized(labels, out))
    assert len(shards) == 5
    got = [doc for ids, offsets, _ in shards for doc in DocIds(ids, offsets).split()]
    expected = DocIds(*vocab.featurize(TEXTS)).split()
    assert len(got) == len(TEXTS) and all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert len(got[5]) == 0 and got[0].dtype == np.int64


def test_shards_are_kept_or_redone_by_what_they_were_made_from(tmp_path):
    labels, vocab_dir = _labels(tmp_path), _vocab(tmp_path)
    out = featurize_labels(labels, vocab_dir, tmp_path / "features")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / SHARDS).glob("*.parquet")}
    # Again: nothing is redone.
    featurize_labels(labels, vocab_dir, out)
    assert {p.name: p.stat().st_mtime_ns for p in (out / SHARDS).glob("*.parquet")} == mtimes
    # A shard whose record is gone (killed while writing it) is redone, alone.
    (out / SHARDS / "00002.json").unlink()
    os.utime(out / SHARDS / "00002.parquet", ns=(0, 0))
    featurize_labels(labels, vocab_dir, out)
    now = {p.name: p.stat().st_mtime_ns for p in (out / SHARDS).glob("*.parquet")}
    assert [n for n in now if now[n] != mtimes[n]] == ["00002.parquet"]
    # Another vocabulary: every shard is redone.
    other = _vocab(tmp_path, size=10, name="vocab10")
    featurize_labels(labels, other, out)
    assert all(p.stat().st_mtime_ns != mtimes[p.name] for p in (out / SHARDS).glob("*.parquet"))
    # The same n-grams with subwords: every shard is redone too, and holds the subword ids.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / SHARDS).glob("*.parquet")}
    set_subwords(other, Subwords(3, 4, 50))
    featurize_labels(labels, other, out)
    assert all(p.stat().st_mtime_ns != mtimes[p.name] for p in (out / SHARDS).glob("*.parquet"))
    got = [doc for ids, offsets, _ in iter_featurized(labels, out) for doc in DocIds(ids, offsets).split()]
    expected = DocIds(*NgramVocab.load(other).featurize(TEXTS)).split()
    assert any(len(d) for d in got) and all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_relabelled_shard_is_refused_until_featurised_again(tmp_path):
    labels, vocab_dir = _labels(tmp_path), _vocab(tmp_path)
    out = featurize_labels(labels, vocab_dir, tmp_path / "features")
    # Shard 1 labelled again (other probabilities, a new checksum in its record).
    fresh = _labels(tmp_path, name="labels2", seed=1)
    for suffix in ("parquet", "json"):
        (labels / SHARDS / f"00001.{suffix}").write_bytes((fresh / SHARDS / f"00001.{suffix}").read_bytes())
    with pytest.raises(DataError, match=r"00001.parquet: missing or made from other labels"):
        list(iter_featurized(labels, out))
    featurize_labels(labels, vocab_dir, out)
    assert sum(len(p) for _, _, p in iter_featurized(labels, out)) == len(TEXTS)


def test_streaming_stored_ids_gives_the_text_streams_batches(tmp_path):
    labels, vocab_dir = _labels(tmp_path), _vocab(tmp_path)
    features = featurize_labels(labels, vocab_dir, tmp_path / "features")
    from sparse_distill.vocab import NgramVocab

    vocab = NgramVocab.load(vocab_dir)
    texts = SoftLabelStream([str(labels)], buffer_size=8, seed=3)
    stored = SoftLabelStream([str(labels)], buffer_size=8, seed=3, feature_dirs=[str(features)])
    assert stored.num_docs == texts.num_docs == len(TEXTS)
    for epoch in (0, 1):
        pairs = list(zip(texts.epoch(epoch, 4), stored.epoch(epoch, 4), strict=True))
        for (batch_texts, probs_a), (batch_ids, probs_b) in pairs:
            assert isinstance(batch_ids, DocIds)
            ids, offsets = vocab.featurize(batch_texts)
            assert np.array_equal(ids, batch_ids.ids) and np.array_equal(offsets, batch_ids.offsets)
            assert np.array_equal(probs_a, probs_b)
    # The train set in memory: featurised once, the same batches in the same order.
    targets = np.eye(3, dtype=np.float32)[np.arange(len(TEXTS)) % 3]
    plain = InMemoryBatches(TEXTS, targets, seed=5)
    once = plain.featurized(vocab)
    for (batch_texts, t_a), (batch_ids, t_b) in zip(plain.epoch(2, 6), once.epoch(2, 6), strict=True):
        ids, offsets = vocab.featurize(batch_texts)
        assert np.array_equal(ids, batch_ids.ids) and np.array_equal(offsets, batch_ids.offsets)
        assert np.array_equal(t_a, t_b)


def _train_with_labels(tmp_path):
    # A labelled train file whose teacher labels are in the folder beside it, and a corpus labelled likewise.
    labels = [i % 3 for i in range(len(TEXTS))]
    train = make_labelled_shards(tmp_path / "train", TEXTS, 5, columns={"label": labels})
    corpus = make_labelled_shards(tmp_path / "corpus", [f"corpus text {i}" for i in range(9)], 4, seed=2)
    path = str(tmp_path / "train.parquet")
    cfg = PipelineConfig(name="t", data=DataConfig(train=path, dev=path), teacher=TeacherConfig(model="unused"))
    return cfg, load_task_data(cfg.data), train, corpus, labels


def test_distill_targets_mix_the_gold_label_into_the_train_rows_only(tmp_path):
    cfg, data, train, corpus, labels = _train_with_labels(tmp_path)
    gold = gold_targets(cfg, data, [str(corpus), str(train)])
    assert list(gold) == [str(train)]
    dirs = [str(train), str(corpus)]
    plain = SoftLabelStream(dirs, buffer_size=8, seed=3)
    mixed = SoftLabelStream(dirs, buffer_size=8, seed=3, gold=gold, gold_weight=0.25)
    row = {t: i for i, t in enumerate(TEXTS)}
    seen = 0
    for (texts_a, probs_a), (texts_b, probs_b) in zip(plain.epoch(1, 4), mixed.epoch(1, 4), strict=True):
        assert texts_a == texts_b
        for text, p, q in zip(texts_a, probs_a, probs_b, strict=True):
            if text in row:
                seen += 1
                expected = 0.75 * p + 0.25 * np.eye(3, dtype=np.float32)[labels[row[text]]]
                np.testing.assert_allclose(q, expected, rtol=1e-6)
            else:
                assert np.array_equal(p, q)  # a corpus document keeps the teacher's distribution
    assert seen == len(TEXTS)


def test_gold_targets_refuses_labels_of_other_rows(tmp_path):
    cfg, data, train, _, _ = _train_with_labels(tmp_path)
    ids, probs = read_soft_labels(train / SHARDS / "00001.parquet")
    write_soft_labels(train / SHARDS / "00001.parquet", ids[::-1], probs)
    with pytest.raises(DataError, match=r"00001.parquet: ids differ from rows 5-10 of .*train.parquet"):
        gold_targets(cfg, data, [str(train)])


def _transfer_with_labels(tmp_path, origins: list[list[tuple[int, float]]] | None):
    # A labelled transfer file of four texts whose source rows (when given) point into the train set of 23 rows.
    texts = ["film great", "dull plot", "fun", "slow film"]
    columns: dict[str, list] = {"id": [f"transfer.parquet:{i}" for i in range(4)]}
    if origins is not None:
        columns["source_rows"] = [[r for r, _ in o] for o in origins]
        columns["source_shares"] = [[w for _, w in o] for o in origins]
    (tmp_path / "t").mkdir()
    return make_labelled_shards(tmp_path / "t" / "transfer", texts, 3, seed=4, columns=columns)


def test_transfer_texts_are_distilled_towards_the_gold_labels_of_their_train_rows(tmp_path):
    cfg, data, train, _, labels = _train_with_labels(tmp_path)
    origins = [[(0, 1.0)], [(1, 0.25), (2, 0.75)], [], [(3, 1.0)]]  # the third: made from no train row
    transfer = _transfer_with_labels(tmp_path, origins)
    gold = gold_targets(cfg, data, [str(train), str(transfer)])
    eye = np.eye(3, dtype=np.float32)
    expected = np.stack([eye[labels[0]], 0.25 * eye[labels[1]] + 0.75 * eye[labels[2]], np.zeros(3), eye[labels[3]]])
    np.testing.assert_allclose(gold[str(transfer)], expected, atol=1e-6)
    plain = SoftLabelStream([str(transfer)], buffer_size=8, seed=3)
    mixed = SoftLabelStream([str(transfer)], buffer_size=8, seed=3, gold=gold, gold_weight=0.5)
    texts = ["film great", "dull plot", "fun", "slow film"]
    for (texts_a, probs_a), (_, probs_b) in zip(plain.epoch(1, 2), mixed.epoch(1, 2), strict=True):
        for text, p, q in zip(texts_a, probs_a, probs_b, strict=True):
            row = texts.index(text)
            if origins[row]:
                np.testing.assert_allclose(q, 0.5 * p + 0.5 * expected[row], rtol=1e-6)
            else:
                assert np.array_equal(p, q)  # no train row behind it: the teacher's distribution alone


def test_transfer_source_rows_outside_the_train_set_are_an_error(tmp_path):
    cfg, data, _, _, _ = _train_with_labels(tmp_path)
    transfer = _transfer_with_labels(tmp_path, [[(0, 1.0)], [(23, 1.0)], [], [(1, 1.0)]])
    with pytest.raises(DataError, match=r"transfer.parquet: source_rows names train row 23, but the train set has 23"):
        gold_targets(cfg, data, [str(transfer)])
