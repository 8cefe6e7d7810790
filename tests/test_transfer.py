"""The transfer set stage: how many texts (`pipeline.transfer_size`), and `pipeline.run_transfer` on a tiny task
(transfer.parquet from the train texts, no teacher needed)."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq

from sparse_distill.config import PipelineConfig, TransferConfig
from sparse_distill.pipeline import run_transfer, stage_fingerprints, transfer_size

WORDS = ["the", "film", "plot", "was", "great", "dull", "and", "really", "fun", "boring", "actors", "a"]


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def _write(path, n: int, seed: int, labelled: bool = True) -> None:
    cols = {"id": [f"{path.stem}{i}" for i in range(n)], "text": _texts(n, seed)}
    if labelled:
        cols["label"] = ["pos" if i % 2 else "neg" for i in range(n)]
    pq.write_table(pa.table(cols), path)


def _config(tmp_path, transfer: dict | None = None, corpus_rows: int = 0, **data) -> PipelineConfig:
    d = tmp_path / "data"
    if not d.exists():
        d.mkdir()
        _write(d / "train.parquet", 20, 1)
        _write(d / "dev.parquet", 10, 2)
    corpus = []
    if corpus_rows:
        _write(d / "corpus.parquet", corpus_rows, 4, labelled=False)
        corpus = ["corpus.parquet"]
    return PipelineConfig.model_validate(
        {
            "data": {"data_dir": str(d), "train": "train.parquet", "dev": "dev.parquet", "corpus": corpus, **data},
            "teacher": {"model": str(tmp_path / "no-teacher-here")},  # run_transfer never loads the teacher
            "transfer": transfer or {},
        }
    )


def _train_words(n: int = 20) -> set[str]:
    return {w for t in _texts(20, 1)[:n] for w in t.split()}


# --- transfer_size ---------------------------------------------------------------------------------------------------


def test_an_explicit_size_wins(tmp_path):
    cfg = _config(tmp_path, {"size": 5})
    assert transfer_size(cfg, 100, 0) == (5, "transfer.size set")
    assert transfer_size(cfg, 100, 10**9) == (5, "transfer.size set")  # even beside a huge corpus
    zero = _config(tmp_path, {"size": 0})
    assert transfer_size(zero, 100, 0) == (0, "transfer.size set")  # 0: no transfer set, even with no corpus


def test_auto_without_a_corpus_is_copies_per_train_row_capped_at_max_size(tmp_path):
    cfg = _config(tmp_path, {"copies_per_text": 3, "max_size": 1000})
    size, reason = transfer_size(cfg, 100, 0)
    assert size == 300 and reason.startswith("auto")
    size, reason = transfer_size(cfg, 400, 0)
    assert size == 1000 and "max_size" in reason and "1,000" in reason
    assert transfer_size(cfg, 0, 0)[0] == 0
    assert transfer_size(_config(tmp_path), 100, 0)[0] == TransferConfig().copies_per_text * 100  # the default


def test_auto_beside_a_big_corpus_is_empty(tmp_path):
    cfg = _config(tmp_path, {"copies_per_text": 3, "max_size": 1000})
    size, reason = transfer_size(cfg, 100, 10**7)
    assert size == 0 and reason.startswith("auto") and "10,000,000" in reason


def test_auto_size_tops_the_corpus_up_to_copies_per_train_row(tmp_path):
    cfg = _config(tmp_path, {"copies_per_text": 3, "max_size": 1000})
    assert transfer_size(cfg, 100, 120)[0] == 180  # 300 documents wanted, 120 in the corpus
    assert transfer_size(cfg, 100, 299)[0] == 1
    assert transfer_size(cfg, 100, 300)[0] == 0
    assert transfer_size(cfg, 1000, 1500)[0] == 1000  # 1500 short, capped at max_size
    assert "120" in transfer_size(cfg, 100, 120)[1]


# --- run_transfer ----------------------------------------------------------------------------------------------------


def _read(path) -> tuple[list[str], list[str], list[str]]:
    table = pq.read_table(path)
    return table.column_names, table.column("id").to_pylist(), table.column("text").to_pylist()


def test_run_transfer_writes_the_texts_from_the_train_set(tmp_path):
    cfg = _config(tmp_path, {"copies_per_text": 3})
    out = tmp_path / "transfer"
    out.mkdir()
    rec = run_transfer(cfg, out)
    assert rec["rows"] == 60 and rec["reason"].startswith("auto")
    assert rec["path"] == str(out / "transfer.parquet")
    columns, ids, texts = _read(rec["path"])
    assert columns == ["id", "text"] and len(ids) == len(set(ids)) == len(texts) == 60
    assert all(t.strip() for t in texts) and {w for t in texts for w in t.split()} <= _train_words()
    again = tmp_path / "again"
    again.mkdir()
    assert _read(run_transfer(cfg, again)["path"]) == (columns, ids, texts)  # seeded: the same set
    other = _config(tmp_path, {"copies_per_text": 3, "seed": 99})
    assert _read(run_transfer(other, again)["path"])[2] != texts


def test_run_transfer_explicit_sizes_and_methods(tmp_path):
    out = tmp_path / "transfer"
    out.mkdir()
    rec = run_transfer(_config(tmp_path, {"size": 7, "methods": ["ngram"]}), out)
    assert rec["rows"] == 7 and rec["reason"] == "transfer.size set"
    train = [t.split() for t in _texts(20, 1)]
    for text in _read(rec["path"])[2]:  # ngram only: contiguous spans of train texts
        span = text.split()
        assert any(words[i : i + len(span)] == span for words in train for i in range(len(words))), text
    rec = run_transfer(_config(tmp_path, {"size": 0}), out)
    assert rec["rows"] == 0 and _read(rec["path"]) == (["id", "text"], [], [])  # an empty file, still readable


def test_run_transfer_uses_only_the_first_max_train_samples_rows(tmp_path):
    out = tmp_path / "transfer"
    out.mkdir()
    rec = run_transfer(_config(tmp_path, {"copies_per_text": 2}, max_train_samples=3), out)
    assert rec["rows"] == 6
    assert {w for t in _read(rec["path"])[2] for w in t.split()} <= _train_words(3)


def test_run_transfer_counts_the_corpus(tmp_path):
    out = tmp_path / "transfer"
    out.mkdir()
    # 40 corpus documents against 2 x 20 wanted (and, with a threshold, a threshold of 40): no transfer set.
    transfer = {"copies_per_text": 2}
    rec = run_transfer(_config(tmp_path, transfer, corpus_rows=40), out)
    assert rec["rows"] == 0 and "40" in rec["reason"] and _read(rec["path"])[1] == []
    # Only the first max_corpus_samples documents count.
    rec = run_transfer(_config(tmp_path, transfer, corpus_rows=40, max_corpus_samples=10), out)
    assert rec["rows"] == 30 and len(_read(rec["path"])[1]) == rec["rows"]
    assert "10" in rec["reason"]


# --- cache keys ------------------------------------------------------------------------------------------------------


def test_the_transfer_config_reaches_the_transfer_stages_and_distillation_only(tmp_path):
    cfg = _config(tmp_path)
    fps = stage_fingerprints(cfg)
    assert {"transfer", "label_transfer"} <= set(fps)
    other = stage_fingerprints(_config(tmp_path, {"methods": ["ngram", "mix"]}))
    changed = {k for k in fps if fps[k] != other[k]}
    assert {"transfer", "label_transfer", "distill", "kdft", "evaluate"} <= changed
    assert not changed & {"teacher", "label_train", "label_corpus", "vocab", "scratch"}
    # With transfer.size 0 there is no transfer set: its settings stay out of distillation's key.
    off = stage_fingerprints(_config(tmp_path, {"size": 0}))
    off_other = stage_fingerprints(_config(tmp_path, {"size": 0, "methods": ["ngram"]}))
    assert off["distill"] != fps["distill"] and off_other["distill"] == off["distill"]
