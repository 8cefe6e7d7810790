"""The soft-label format: the shard schema, a round trip, and ids checked against the source rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_distill.data import DataError
from sparse_distill.shard_plan import CorpusSource, open_plan, write_record
from sparse_distill.soft_labels import (
    LABELLING,
    SCHEMA,
    SHARDS,
    LabelRecord,
    iter_soft_labels,
    read_soft_labels,
    write_soft_labels,
)


def test_a_shard_holds_ids_probabilities_and_logits_as_float32(tmp_path):
    logits = np.array([[0.0, 1.0], [2.0, -1.0]], np.float64)
    path = write_soft_labels(tmp_path / "00000.parquet", ["a", "b"], logits)
    table = pq.read_table(path)
    assert table.schema.equals(SCHEMA)
    np.testing.assert_allclose(np.array(table.column("logits").to_pylist()), logits)
    ids, probs = read_soft_labels(path)
    assert ids == ["a", "b"] and probs.dtype == np.float32
    np.testing.assert_allclose(probs, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), rtol=1e-6)


def test_soft_labels_join_back_to_the_source_rows_and_ids_are_checked(tmp_path):
    pq.write_table(pa.table({"text": [f"text {i}" for i in range(5)]}), tmp_path / "c.parquet")
    out = tmp_path / "labels"
    plan = open_plan(out, LABELLING, [CorpusSource(str(tmp_path / "c.parquet"))], 3)
    for shard in plan.shards:
        ids = [f"c.parquet:{i}" for i in range(shard.start, shard.stop)]
        write_soft_labels(out / SHARDS / shard.name, ids, np.zeros((shard.size, 2)))
        write_record(out, LABELLING, LabelRecord(**vars(shard.spec()), status="done", rows=shard.size))
    batches = list(iter_soft_labels(out))
    assert [t for texts, _ in batches for t in texts] == [f"text {i}" for i in range(5)]
    assert np.allclose(np.concatenate([p for _, p in batches]), 0.5)
    write_soft_labels(out / SHARDS / "00001.parquet", ["x", "y"], np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"00001.parquet: ids do not match rows 3-5 of .*c\.parquet"):
        list(iter_soft_labels(out))
