"""Labelling into Parquet shards: the schema, resuming, and redoing a corrupt shard."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_distill.config import PipelineConfig
from sparse_distill.data import DataError
from sparse_distill.labelling import CorpusSource, LabelManifest, iter_soft_labels, plan_shards
from sparse_distill.pipeline import run_label
from sparse_distill.teacher import TeacherPredictor


@pytest.fixture
def corpus(tmp_path):
    texts = [f"review number {i} was {'good' if i % 2 else 'bad'}" for i in range(250)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "corpus.parquet", row_group_size=64)
    return tmp_path / "corpus.parquet"


def _cfg(tiny_teacher, shard_size=100) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "data": {"train": "x", "dev": "y"},
            "teacher": {"model": str(tiny_teacher), "max_length": 32},
            "label": {"shard_size": shard_size, "batch_size": 16},
        }
    )


def test_plan_is_deterministic(corpus):
    a = plan_shards([CorpusSource(str(corpus))], 100)
    b = plan_shards([CorpusSource(str(corpus))], 100)
    assert [(s.start, s.stop) for s in a.shards] == [(0, 100), (100, 200), (200, 250)]
    assert a.to_json() == b.to_json()


def test_label_writes_schema_resumes_and_redoes_corrupt_shards(tiny_teacher, corpus, tmp_path):
    out = tmp_path / "labels"
    cfg = _cfg(tiny_teacher)
    res = run_label(cfg, str(tiny_teacher), [CorpusSource(str(corpus))], out)
    assert res["rows"] == 250 and res["shards"] == 3
    table = pq.read_table(out / "shards" / "00000.parquet")
    assert table.schema.field("id").type == pa.string()
    assert table.schema.field("probs").type == pa.list_(pa.float32())
    assert table.schema.field("logits").type == pa.list_(pa.float32())
    probs = np.array(table.column("probs").to_pylist())
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    texts = pq.read_table(corpus).column("text").to_pylist()[:100]
    expected = TeacherPredictor(tiny_teacher, max_length=32).predict_proba(texts)
    np.testing.assert_allclose(probs, expected, atol=1e-5)

    # Re-run: nothing is relabelled (same mtimes); a corrupt shard is detected and redone.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    run_label(cfg, str(tiny_teacher), [CorpusSource(str(corpus))], out)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == mtimes
    with open(out / "shards" / "00001.parquet", "r+b") as f:
        f.truncate(100)
    run_label(cfg, str(tiny_teacher), [CorpusSource(str(corpus))], out)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert after["00000.parquet"] == mtimes["00000.parquet"] and after["00001.parquet"] != mtimes["00001.parquet"]
    ids = [i for s in range(3) for i in pq.read_table(out / "shards" / f"{s:05d}.parquet").column("id").to_pylist()]
    assert ids == [f"corpus.parquet:{i}" for i in range(250)]
    streamed = list(iter_soft_labels(out))
    assert sum(len(t) for t, _ in streamed) == 250 and streamed[0][0][:100] == texts
    assert not [p for p in os.listdir(out / "shards") if p.endswith(".tmp")]


def test_unfinished_shard_blocks_distillation_with_a_clear_error(tiny_teacher, corpus, tmp_path):
    out = tmp_path / "labels"
    plan_shards([CorpusSource(str(corpus))], 100).save(out)
    with pytest.raises(DataError, match="shard 00000.parquet is pending"):
        next(iter_soft_labels(out))
    assert LabelManifest.load(out).total_rows == 250
