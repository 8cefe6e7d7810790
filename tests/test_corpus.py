"""Streaming corpus reading: every format gives the same rows as reading the file whole; bad rows are named."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from sparse_distill.corpus import corpus_format, index_rows, read_rows
from sparse_distill.data import DataError

TEXTS = [f'document {i}, with a comma and "quotes" {"é" * (i % 3)}' for i in range(23)]


@pytest.fixture(params=["parquet", "txt", "jsonl", "csv", "tsv"])
def corpus_file(request, tmp_path):
    fmt = request.param
    path = tmp_path / f"corpus.{fmt}"
    ids = [f"id{i:03d}" for i in range(len(TEXTS))]
    if fmt == "parquet":
        pq.write_table(pa.table({"text": TEXTS, "doc": ids}), path, row_group_size=5)
    elif fmt == "txt":
        path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "doc": d}) + "\n" for t, d in zip(TEXTS, ids, strict=True)))
    else:
        opts = pacsv.WriteOptions(delimiter="\t" if fmt == "tsv" else ",")
        pacsv.write_csv(pa.table({"text": TEXTS, "doc": ids}), path, opts)
    return fmt, str(path)


def test_every_format_streams_the_same_rows(corpus_file):
    fmt, path = corpus_file
    assert corpus_format(path) == fmt
    idx = index_rows(path, every=7)
    assert idx.rows == len(TEXTS)
    id_col = None if fmt == "txt" else "doc"
    got_texts, got_ids = [], []
    for k, start in enumerate(range(0, idx.rows, 7)):
        offset = idx.offsets[k] if idx.offsets else None
        texts, ids = read_rows(path, start, min(start + 7, idx.rows), "text", id_col, offset)
        got_texts += texts
        got_ids += ids
    assert got_texts == TEXTS
    expected_ids = (
        [f"corpus.{fmt}:{i}" for i in range(len(TEXTS))] if id_col is None else [f"id{i:03d}" for i in range(23)]
    )
    assert got_ids == expected_ids
    # Without an offset a line file is scanned from the top: same rows.
    assert read_rows(path, 14, 21, "text", id_col)[0] == TEXTS[14:21]
    assert index_rows(path, every=7, limit=10).rows == 10


def test_bad_rows_name_the_file_row_and_column(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("good one\n\nanother\n")
    with pytest.raises(DataError, match=r"c\.txt: row 1, column 'text': text is empty"):
        read_rows(str(txt), 0, 3)
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "fine"}\n{"text": "fine", \n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl: row 1: invalid JSON"):
        read_rows(str(jl), 0, 3)
    with pytest.raises(DataError, match=r"c\.jsonl: row 2: key 'text' not found"):
        read_rows(str(jl), 2, 3)
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"column 'text' not found"):
        read_rows(str(tmp_path / "c.parquet"), 0, 1)
    with pytest.raises(DataError, match="no such file"):
        index_rows(str(tmp_path / "missing.parquet"), 10)
