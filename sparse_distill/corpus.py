"""Streaming corpus files: count rows and read row ranges without loading a file whole.

Parquet is read by row groups. Plain text (one document per line) and JSONL (one object per line) are indexed by
the byte offset of each shard's first line while planning, so a shard is read with one seek. CSV/TSV is streamed
through Arrow's incremental reader. Any other input a split may use (a saved `datasets` folder, hub:NAME:SPLIT) is
read whole: fine for a train split, not for a corpus.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from sparse_distill.data import (
    DataError,
    check_texts,
    decode_line,
    ids_for_rows,
    open_parquet,
    read_parquet_rows,
    read_table,
)

logger = logging.getLogger(__name__)


def corpus_format(path: str) -> str:
    """'parquet', 'txt', 'jsonl', 'csv', 'tsv' or 'other' (read whole), from the file name."""
    name = path.lower()
    if path.startswith("hub:") or Path(path).is_dir():
        return "other"
    for ext, fmt in ((".parquet", "parquet"), (".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv")):
        if name.endswith(ext):
            return fmt
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".txt") or Path(name).suffix == "":
        return "txt"
    return "other"


@dataclass(frozen=True)
class RowIndex:
    """Rows of a file and, for line formats, the byte offset of every `every`-th row."""

    rows: int
    offsets: list[int] | None


def index_rows(path: str, every: int, limit: int | None = None) -> RowIndex:
    """Count a file's rows (up to `limit`), streaming; line formats also get byte offsets every `every` rows."""
    fmt = corpus_format(path)
    if not Path(path).exists() and not path.startswith("hub:"):
        raise DataError(f"{path}: no such file")
    if fmt == "parquet":
        n = open_parquet(path).metadata.num_rows
    elif fmt in ("txt", "jsonl"):
        offsets, n, pos = [], 0, 0
        with open(path, "rb") as f:
            for line in f:
                if limit is not None and n >= limit:
                    break
                if n % every == 0:
                    offsets.append(pos)
                pos += len(line)
                n += 1
        return RowIndex(n, offsets)
    elif fmt in ("csv", "tsv"):
        n = 0
        for batch in _csv_reader(path, 0):
            n += batch.num_rows
            if limit is not None and n >= limit:
                break
    else:
        n = read_table(path).num_rows
    return RowIndex(min(n, limit) if limit is not None else n, None)


def check_columns(path: str, columns: list[str]) -> None:
    """Check, without reading the rows, that a corpus file can be opened and has `columns` (Parquet and CSV/TSV: the
    schema; JSONL: the first row's keys; plain text has its one column): a DataError naming the file and column, so
    a corpus without its text column stops at planning instead of failing every shard."""
    fmt = corpus_format(path)
    if fmt == "txt" or path.startswith("hub:"):
        return
    if not Path(path).exists():
        raise DataError(f"{path}: no such file")
    if fmt == "parquet":
        names = open_parquet(path).schema_arrow.names
    elif fmt in ("csv", "tsv"):
        names = _csv_reader(path, 0).schema.names
    elif fmt == "jsonl":
        with open(path, "rb") as f:
            first = f.readline()
        if not first.strip():
            return
        names = list(_json_object(path, 0, decode_line(first, path, 0)))
    else:
        names = read_table(path).column_names
    for c in columns:
        if c not in names:
            raise DataError(f"{path}: column {c!r} not found (columns: {names})")


def _csv_reader(path: str, skip: int, columns: list[str] | None = None) -> pacsv.CSVStreamingReader:
    delim = "\t" if corpus_format(path) == "tsv" else ","
    try:
        return pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(skip_rows_after_names=skip, block_size=1 << 22),
            parse_options=pacsv.ParseOptions(delimiter=delim, newlines_in_values=True),
            # Texts and ids stay strings: "007" must not become 7.
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns or []}),
        )
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: cannot be read as CSV: {e}") from e


def read_rows(
    path: str,
    start: int,
    stop: int,
    text_column: str = "text",
    id_column: str | None = None,
    offset: int | None = None,
    id_prefix: str | None = None,
) -> tuple[list[str], list[str]]:
    """Texts and ids of rows [start, stop) of one file, read without loading the file whole.

    `offset` is the byte offset of row `start` in a line format (from `index_rows`); without it the file is scanned
    from the top. Every text must be a non-empty string: a bad row is a DataError naming the file, row and column.
    """
    fmt = corpus_format(path)
    columns = [c for c in (text_column, id_column) if c]
    if fmt in ("txt", "jsonl"):
        texts, raw_ids = _read_lines(path, start, stop, fmt, text_column, id_column, offset)
        texts = check_texts(texts, path, text_column if fmt == "jsonl" else "text", first_row=start)
        if id_column is None:
            return texts, ids_for_rows(id_prefix or Path(path).name, start, len(texts))
        return texts, raw_ids
    if fmt == "parquet":
        table = read_parquet_rows(path, start, stop, columns)
    elif fmt in ("csv", "tsv"):
        table = _read_csv_rows(path, start, stop, columns)
    else:
        table = read_table(path).slice(start, stop - start)
    for c in columns:
        if c not in table.column_names:
            raise DataError(f"{path}: column {c!r} not found (columns: {table.column_names})")
    texts = check_texts(table.column(text_column).to_pylist(), path, text_column, first_row=start)
    if id_column is None:
        return texts, ids_for_rows(id_prefix or Path(path).name, start, len(texts))
    ids = [None if v is None else str(v) for v in table.column(id_column).to_pylist()]
    for i, v in enumerate(ids):
        if v is None:
            raise DataError(f"{path}: row {start + i}, column {id_column!r}: id is missing")
    return texts, ids  # type: ignore[return-value]


def _read_lines(
    path: str, start: int, stop: int, fmt: str, text_column: str, id_column: str | None, offset: int | None
) -> tuple[list, list[str]]:
    texts: list = []
    ids: list[str] = []
    with open(path, "rb") as f:
        row = start if offset is not None else 0
        if offset is not None:
            f.seek(offset)
        for line in f:
            if row >= stop:
                break
            if row >= start:
                s = decode_line(line, path, row)
                if fmt == "txt":
                    texts.append(s)
                else:
                    texts.append(_json_field(path, row, s, text_column))
                    if id_column is not None:
                        v = _json_field(path, row, s, id_column)
                        if v is None:
                            raise DataError(f"{path}: row {row}, column {id_column!r}: id is missing")
                        ids.append(str(v))
            row += 1
    if row < stop:
        raise DataError(f"{path}: has {row} rows, expected at least {stop}: the file changed since it was planned")
    return texts, ids


def _json_object(path: str, row: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: row {row}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: row {row}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _json_field(path: str, row: int, line: str, column: str):
    obj = _json_object(path, row, line)
    if column not in obj:
        raise DataError(f"{path}: row {row}: key {column!r} not found (keys: {sorted(obj)})")
    return obj[column]


def _read_csv_rows(path: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    reader = _csv_reader(path, start, columns)
    names = reader.schema.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: column {missing[0]!r} not found (columns: {names})")
    pieces, n = [], 0
    for batch in reader:
        take = min(batch.num_rows, stop - start - n)
        pieces.append(pa.Table.from_batches([batch.slice(0, take)]).select(columns))
        n += take
        if n >= stop - start:
            break
    if not pieces:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(pieces, promote_options="permissive")
