"""Corpus-scale n-gram counting: map shards to hash-partitioned spills, sum each partition, select the top |V|.

No step holds all distinct n-grams, and each step's memory is bounded by `memory_mb` (and the final selection by
|V|), not by the corpus:
- map: a shard's documents are counted a chunk at a time (`count_ngram_table`, the student's own tokenisation);
  partial counts are merged until they near the budget, then spilled to the shard's Parquet file, one row group
  per hash partition of the n-gram.
- reduce: each partition sums its row groups from every shard; a partition too big for the budget is summed in
  several passes, each over a disjoint slice of the hash space.
- select: a histogram of counts from every partition gives the count at the cut; then only n-grams at or above it
  are read, and the ties at the cut are resolved by the tie rule (`sparse_distill.vocab.select_top_files`).

Layout of OUT (resumable: a re-run redoes only what is missing or stale):
    OUT/manifest.json          the plan: corpus files, shard row ranges, file sizes and mtimes
    OUT/counting.json          settings the counts depend on (n-gram order, partitions, tokenisation)
    OUT/spills/NNNNN.parquet   shard N's partial counts (ngram, count); each row group holds one partition
    OUT/spills/NNNNN.json      shard N's record: which row group is which partition, its input checksum
    OUT/counts/PPPPP.parquet   partition P's total counts (ngram, count) over the whole corpus
    OUT/counts/PPPPP.json      partition P's record: the shard inputs it summed, a histogram of its counts
    OUT/counts/_SUCCESS.json   every partition summed from these inputs (the spills may then be removed)
    OUT/vocab.parquet          the kept n-grams (ngram, count); row i is embedding row i
    OUT/vocab.json             the vocabulary's settings (read by `NgramVocab.load`)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sparse_distill.config import VocabJob
from sparse_distill.data import DataError, atomic_path, atomic_write_text, expand_paths
from sparse_distill.ngram_kernels import mix
from sparse_distill.shard_plan import (
    CorpusSource,
    PlanKind,
    ShardPlan,
    ShardRecord,
    ShardSpec,
    input_checksum,
    open_plan,
    pending_work,
    read_record,
    read_shard,
    record_failure,
    record_failure_if_possible,
    run_pending,
    work_item,
    write_record,
)
from sparse_distill.vocab import (
    TOKEN_PATTERN,
    NgramVocab,
    Subwords,
    count_ngram_table,
    merge_count_tables,
    select_top_files,
    set_subwords,
    write_vocab,
)

logger = logging.getLogger(__name__)

SETTINGS = "counting.json"
SPILLS = "spills"
COUNTS = "counts"
SUCCESS = "_SUCCESS.json"
# Bumped when the spill or partition layout changes, so old counts are never mixed with new ones.
FORMAT_VERSION = 1
# Peak memory of `count_ngram_table` per character of text (n = 1..4 takes and joins, numpy temporaries), measured
# on IMDB; and the chunk and merge sizes past which counting only gets slower (hash tables out of cache).
_BYTES_PER_CHAR = 128
_MAX_CHUNK_CHARS = 2 << 20
_MAX_HOLD_BYTES = 32 << 20
# Peak memory of merging count tables, as a multiple of their Arrow size (concatenation plus the hash table).
_MERGE_FACTOR = 3


# --- hashing n-grams to partitions ----------------------------------------------------------------------------------


def ngram_hash(ngrams: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each string, vectorised over Arrow's buffers, the same on every machine and process.

    Hashes the length, the first 8 and the last 8 bytes: enough to spread distinct n-grams evenly, and ~10x faster
    than hashing every byte. Only used to partition work, never as an identity.
    """
    arr = ngrams.combine_chunks() if isinstance(ngrams, pa.ChunkedArray) else ngrams
    if len(arr) == 0:
        return np.zeros(0, np.uint64)
    width = 8 if pa.types.is_large_string(arr.type) else 4
    offs = np.frombuffer(
        arr.buffers()[1], dtype=np.int64 if width == 8 else np.int32, count=len(arr) + 1, offset=arr.offset * width
    ).astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    padded = np.concatenate([np.zeros(8, np.uint8), data[: offs[-1]], np.zeros(8, np.uint8)])
    lens = np.diff(offs)
    k = np.arange(8)
    head = np.where(k < lens[:, None], padded[(offs[:-1] + 8)[:, None] + k], 0).astype(np.uint8)
    tail = np.where(k >= 8 - lens[:, None], padded[offs[1:][:, None] + k], 0).astype(np.uint8)
    a = np.ascontiguousarray(head).view(np.uint64).ravel()
    b = np.ascontiguousarray(tail).view(np.uint64).ravel()
    with np.errstate(over="ignore"):
        return mix(mix(a ^ lens.astype(np.uint64)) ^ b)


def partition_of(ngrams: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """The hash partition (0..partitions-1) of each n-gram."""
    return (ngram_hash(ngrams) % np.uint64(partitions)).astype(np.int64)


# --- map: one shard -> one spill file -------------------------------------------------------------------------------


@dataclass
class SpillRecord(ShardRecord):
    """A counted shard: where each partition's counts are in its spill."""

    docs: int = 0
    spill_bytes: int = 0
    distinct: int = 0  # rows spilled (an n-gram spilled twice counts twice)
    # [partition, row group, rows, in-memory bytes] for every row group of the spill
    row_groups: list[list[int]] = field(default_factory=list)


# The counting folder's plan: its shards' spills and records in spills/, the partition sums in counts/.
COUNTING = PlanKind(
    name="counting",
    outputs="counts",
    records=SPILLS,
    record_type=SpillRecord,
    more_folders=(COUNTS,),
    settings_file=SETTINGS,
)
_SCHEMA = pa.schema([("ngram", pa.string()), ("count", pa.int64())])


class _SpillWriter:
    """Appends count tables to one Parquet file, one row group per partition per spill."""

    def __init__(self, path: Path, partitions: int) -> None:
        self.partitions = partitions
        self.writer = pq.ParquetWriter(path, _SCHEMA, compression="lz4")
        self.row_groups: list[list[int]] = []

    def spill(self, table: pa.Table) -> None:
        part = partition_of(table.column("ngram"), self.partitions)
        order = np.argsort(part, kind="stable")
        table, part = table.take(pa.array(order)), part[order]
        bounds = np.searchsorted(part, np.arange(self.partitions + 1))
        for p in np.nonzero(np.diff(bounds))[0]:
            piece = table.slice(int(bounds[p]), int(bounds[p + 1] - bounds[p]))
            self.writer.write_table(piece, row_group_size=piece.num_rows)  # exactly one row group
            self.row_groups.append([int(p), len(self.row_groups), piece.num_rows, piece.nbytes])

    def close(self) -> None:
        self.writer.close()


def count_shard(
    source: CorpusSource, shard: ShardSpec, out_dir: str | Path, ngram_max: int, partitions: int, memory_mb: int
) -> SpillRecord:
    """Count one shard's n-grams into `OUT/spills/NNNNN.parquet`, then write its record (both atomically).

    Documents are counted in chunks sized to the budget; partial counts are merged while they fit in about a
    quarter of `memory_mb` and spilled, hash-partitioned, when they do not.
    """
    start = time.perf_counter()
    texts, ids = read_shard(source, shard)
    in_sum = input_checksum(ids, texts)
    del ids
    budget = memory_mb * 2**20
    chunk_chars = max(min(budget // (4 * _BYTES_PER_CHAR), _MAX_CHUNK_CHARS), 1 << 16)
    hold_bytes = min(budget // (4 * _MERGE_FACTOR), _MAX_HOLD_BYTES)
    rec = SpillRecord(**asdict(shard.spec()), status="done", docs=len(texts), input_checksum=in_sum)
    path = Path(out_dir) / SPILLS / rec.name
    with atomic_path(path) as tmp:
        writer = _SpillWriter(tmp, partitions)
        try:
            held: list[pa.Table] = []
            held_bytes = 0
            for chunk in _chunks_by_chars(texts, chunk_chars):
                part = count_ngram_table(chunk, ngram_max)
                held.append(part)
                held_bytes += part.nbytes
                if held_bytes > hold_bytes:
                    merged = merge_count_tables(held)
                    held = []
                    if merged.nbytes > hold_bytes // 2:
                        # Merging no longer shrinks the counts much (rare n-grams dominate): spill them.
                        writer.spill(merged)
                        held_bytes = 0
                    else:
                        held, held_bytes = [merged], merged.nbytes
            if held:
                writer.spill(merge_count_tables(held))
        finally:
            writer.close()
    rec.spill_bytes = path.stat().st_size
    rec.row_groups = writer.row_groups
    rec.distinct = sum(rg[2] for rg in writer.row_groups)
    rec.seconds = round(time.perf_counter() - start, 3)
    logger.info(
        "shard %05d: %d docs, %d partial counts in %.1f s (%.0f docs/s)",
        rec.index,
        rec.docs,
        rec.distinct,
        rec.seconds,
        rec.docs / max(rec.seconds, 1e-9),
    )
    write_record(out_dir, COUNTING, rec)
    return rec


def _chunks_by_chars(texts: list[str], max_chars: int):
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def spill_is_complete(out_dir: str | Path, rec: SpillRecord | None) -> bool:
    """Done, and its spill file is there with the recorded size (a file cut short by a crash is not)."""
    if rec is None or rec.status != "done":
        return False
    path = Path(out_dir) / SPILLS / rec.name
    return path.exists() and path.stat().st_size == rec.spill_bytes


# --- reduce: one partition summed over every shard ------------------------------------------------------------------


@dataclass
class PartitionRecord:
    """A summed partition: the shard inputs it came from, its size and a histogram of its counts."""

    part: int
    inputs: str  # fingerprint of the shard inputs summed
    rows: int
    bytes: int
    passes: int
    seconds: float
    histogram: list[list[int]]  # [count, number of n-grams with that count], count ascending

    @property
    def name(self) -> str:
        return f"{self.part:05d}.parquet"


def reduce_partition(
    out_dir: str | Path, part: int, pieces: list[list[int]], partitions: int, memory_mb: int, inputs: str
) -> PartitionRecord:
    """Sum partition `part` over its spilled row groups (`pieces`: [shard, row group, rows, bytes]) into
    `OUT/counts/PPPPP.parquet`, then write its record.

    A partition bigger than the budget is summed in several passes over disjoint slices of the hash space, so a
    pass holds about `memory_mb`.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    total = sum(p[3] for p in pieces)
    passes = max(1, math.ceil(total * _MERGE_FACTOR / (memory_mb * 2**20)))
    counts_dir = out_dir / COUNTS
    counts_dir.mkdir(parents=True, exist_ok=True)
    path = counts_dir / f"{part:05d}.parquet"
    histogram: Counter[int] = Counter()
    rows = 0
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(tmp, _SCHEMA, compression="zstd")
        try:
            files: dict[int, pq.ParquetFile] = {}
            for k in range(passes):
                tables = []
                for shard, rg, _, _ in pieces:
                    if shard not in files:
                        files[shard] = pq.ParquetFile(out_dir / SPILLS / f"{shard:05d}.parquet")
                    table = files[shard].read_row_group(rg)
                    if passes > 1:
                        # The hash's bits above the partition number pick the pass.
                        h = ngram_hash(table.column("ngram")) // np.uint64(partitions)
                        table = table.filter(pa.array(h % np.uint64(passes) == np.uint64(k)))
                    tables.append(table)
                summed = merge_count_tables(tables) if tables else _SCHEMA.empty_table()
                del tables
                writer.write_table(summed)
                rows += summed.num_rows
                values, freq = np.unique(summed.column("count").to_numpy(), return_counts=True)
                histogram.update(dict(zip(values.tolist(), freq.tolist(), strict=True)))
        finally:
            writer.close()
    rec = PartitionRecord(
        part=part,
        inputs=inputs,
        rows=rows,
        bytes=path.stat().st_size,
        passes=passes,
        seconds=round(time.perf_counter() - start, 3),
        histogram=sorted([c, n] for c, n in histogram.items()),
    )
    atomic_write_text(counts_dir / f"{part:05d}.json", json.dumps(asdict(rec)))
    logger.info("partition %05d: %d distinct n-grams in %d pass(es), %.1f s", part, rows, passes, rec.seconds)
    return rec


def read_partition_record(out_dir: str | Path, part: int, inputs: str) -> PartitionRecord | None:
    """The partition's record if it was summed from these inputs and its file is intact, else None."""
    path = Path(out_dir) / COUNTS / f"{part:05d}.json"
    try:
        rec = PartitionRecord(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError):
        return None
    data = Path(out_dir) / COUNTS / rec.name
    if rec.inputs != inputs or not data.exists() or data.stat().st_size != rec.bytes:
        return None
    return rec


# --- the plan and a whole job: what the CLI, the flow and the pipeline share ----------------------------------------


def job_sources(job: VocabJob) -> list[CorpusSource]:
    """The job's input files (globs expanded, sorted) as sources."""
    return [CorpusSource(p, job.text_column, None, job.limit) for p in expand_paths(job.inputs)]


def job_settings(job: VocabJob) -> dict[str, Any]:
    """What the counts depend on besides the corpus; a change means counting again."""
    return {
        "format": FORMAT_VERSION,
        "ngram_max": job.vocab.ngram_max,
        "partitions": job.vocab.partitions,
        "token_pattern": TOKEN_PATTERN,
        "lowercase": True,
    }


def inputs_fingerprint(records: list[SpillRecord]) -> str:
    """Which shard inputs a partition sums: their input checksums in plan order."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.index}:{r.input_checksum};".encode())
    return h.hexdigest()[:32]


def _success(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / COUNTS / SUCCESS).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def prepare_count(job: VocabJob, sources: list[CorpusSource] | None = None) -> dict[str, Any]:
    """Plan (or reopen) the job's output and list the shards still to count; returns a small manifest.

    `sources` replaces the job's inputs when the files need their own row limits (the pipeline's train split and
    corpus). Nothing is pending when every partition was already summed from the same inputs (spills may be gone).
    Counts made from other inputs or settings are an error unless `job.replan` (then they are removed).
    """
    out = Path(job.out)
    plan = open_plan(out, COUNTING, sources or job_sources(job), job.vocab.shard_size, job.replan, job_settings(job))
    records = [read_record(out, COUNTING, s) for s in plan.shards]
    done = [r for r in records if r is not None and r.status == "done"]
    success = _success(out)
    summed = (
        success is not None
        and len(done) == len(plan.shards)
        and success.get("inputs") == inputs_fingerprint(done)
        and success.get("settings") == job_settings(job)
    )
    pending = (
        [] if summed else [s.index for s, r in zip(plan.shards, records, strict=True) if not spill_is_complete(out, r)]
    )
    return {**pending_work(out, plan, pending), "summed": summed}


def count_job_shard(job: VocabJob, work: dict[str, Any]) -> dict[str, Any]:
    """Count one pending shard (an item of `prepare_count`'s `work`); returns its record."""
    source, shard = work_item(work)
    v = job.vocab
    try:
        return asdict(count_shard(source, shard, job.out, v.ngram_max, v.partitions, v.memory_mb))
    except Exception as e:
        record_failure_if_possible(job.out, COUNTING, shard, e)  # as labelling: recorded where it happened
        raise


def fail_count_shard(job: VocabJob, work: dict[str, Any], error: str) -> dict[str, Any]:
    """Record a pending shard (an item of `prepare_count`'s `work`) as failed with its error."""
    return asdict(record_failure(job.out, COUNTING, work_item(work)[1], error))


class CountingFailed(DataError):
    """Some shards failed after their retries; the others are counted."""


def prepare_reduce(job: VocabJob) -> dict[str, Any]:
    """Check every shard is counted and list the partitions still to sum, each with its row groups."""
    out = Path(job.out)
    plan = ShardPlan.load(out, COUNTING)
    records = [read_record(out, COUNTING, s) for s in plan.shards]
    failed = [(s, r) for s, r in zip(plan.shards, records, strict=True) if r is not None and r.status == "failed"]
    if failed:
        lines = "; ".join(
            f"{r.name} ({plan.sources[s.source].path} rows {s.start}-{s.stop}): {r.error}" for s, r in failed
        )
        raise CountingFailed(
            f"{len(failed)} of {len(plan.shards)} shards failed: {lines}. The others are counted; fix the cause and "
            "re-run the same command."
        )
    missing = [s.index for s, r in zip(plan.shards, records, strict=True) if r is None or r.status != "done"]
    if missing:
        raise CountingFailed(f"{out}: shards {missing[:10]} are not counted yet; re-run the same command")
    done = [r for r in records if r is not None]
    inputs = inputs_fingerprint(done)
    partitions = job.vocab.partitions
    pieces: list[list[list[int]]] = [[] for _ in range(partitions)]
    for r in done:
        for p, rg, rows, nbytes in r.row_groups:
            pieces[p].append([r.index, rg, rows, nbytes])
    pending = [p for p in range(partitions) if read_partition_record(out, p, inputs) is None]
    return {
        "inputs": inputs,
        "partitions": partitions,
        "pending": pending,
        "work": [{"part": p, "pieces": pieces[p]} for p in pending],
        "docs": sum(r.docs for r in done),
    }


def reduce_job_partition(job: VocabJob, work: dict[str, Any], inputs: str) -> dict[str, Any]:
    """Sum one partition (an item of `prepare_reduce`'s `work`); returns its record."""
    v = job.vocab
    return asdict(reduce_partition(job.out, work["part"], work["pieces"], v.partitions, v.memory_mb, inputs))


def finish_count(job: VocabJob, inputs: str, docs: int) -> dict[str, Any]:
    """Select the top |V| from the summed partitions, write `vocab.parquet`, and (unless kept) remove the spills."""
    out = Path(job.out)
    v = job.vocab
    records = []
    for p in range(v.partitions):
        rec = read_partition_record(out, p, inputs)
        if rec is None:
            raise CountingFailed(f"{out / COUNTS}: partition {p:05d} is missing or stale; re-run the same command")
        records.append(rec)
    start = time.perf_counter()
    histogram: Counter[int] = Counter()
    for rec in records:
        histogram.update({c: n for c, n in rec.histogram})
    distinct = sum(histogram.values())
    kept = select_top_files([out / COUNTS / r.name for r in records], histogram, v.size, v.min_count, v.tie_rule)
    write_vocab(
        kept,
        v.ngram_max,
        out,
        extra={
            "distinct_ngrams": distinct,
            "docs": docs,
            "min_count": v.min_count,
            "tie_rule": v.tie_rule,
            "selection": _selection(job, inputs),
            **({"subwords": sub.to_json()} if (sub := Subwords.from_config(v)) else {}),
        },
    )
    NgramVocab.load(out)  # checks what was written, and saves the n-gram -> row lookup next to it
    _mark_summed(job, inputs)
    logger.info(
        "%s: kept %d of %d distinct n-grams (%.1f s to select)",
        out,
        kept.num_rows,
        distinct,
        time.perf_counter() - start,
    )
    return _result(out, kept.column("count"), distinct, docs)


def _mark_summed(job: VocabJob, inputs: str) -> None:
    """Record that every partition is summed from `inputs`; then the spills can go (unless kept)."""
    out = Path(job.out)
    atomic_write_text(
        out / COUNTS / SUCCESS,
        json.dumps({"inputs": inputs, "settings": job_settings(job), "spills_kept": job.keep_spills}),
    )
    if not job.keep_spills:
        for p in (out / SPILLS).glob("*.parquet"):
            p.unlink()


def _selection(job: VocabJob, inputs: str) -> dict[str, Any]:
    """What a selection depends on: the summed inputs and the choice of size, min count and tie rule."""
    v = job.vocab
    return {"inputs": inputs, "size": v.size, "min_count": v.min_count, "tie_rule": v.tie_rule}


def _result(out: Path, counts: pa.ChunkedArray | pa.Array, distinct: int, docs: int) -> dict[str, Any]:
    return {
        "out": str(out),
        "vocab": str(out / "vocab.parquet"),
        "size": len(counts),
        "distinct_ngrams": distinct,
        "docs": docs,
        "min_kept_count": int(pc.min(counts).as_py()) if len(counts) else None,
    }


def finish_without_reduce(job: VocabJob) -> dict[str, Any]:
    """Every partition is already summed from these inputs: only select again (a new --size or --min-count)."""
    out = Path(job.out)
    success = _success(out) or {}
    try:
        meta = json.loads((out / "vocab.json").read_text())
        if meta.get("selection") == _selection(job, success["inputs"]) and (out / "vocab.parquet").exists():
            # Already selected just so (the pipeline's stage after its counting flow): nothing to do again.
            counts = pq.read_table(out / "vocab.parquet", columns=["count"]).column("count")
            set_subwords(out, Subwords.from_config(job.vocab))  # the one setting selection does not decide
            _mark_summed(job, success["inputs"])
            return _result(out, counts, meta["distinct_ngrams"], meta["docs"])
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    plan = ShardPlan.load(out, COUNTING)
    records = [read_record(out, COUNTING, s) for s in plan.shards]
    docs = sum(r.docs for r in records if isinstance(r, SpillRecord))
    return finish_count(job, success["inputs"], docs)


def run_count_job(job: VocabJob, progress: Any = None, sources: list[CorpusSource] | None = None) -> dict[str, Any]:
    """The whole job in this process, step after step (no Prefect): plan, count, sum, select.

    Raises `CountingFailed` naming the shards that failed (after being recorded); the others stay counted.
    `progress(rows_done, rows_total)` is called after each shard.
    """
    prep = prepare_count(job, sources)
    if prep["summed"]:
        return finish_without_reduce(job)
    run_pending(prep, lambda w: count_job_shard(job, w), lambda w, e: fail_count_shard(job, w, e), progress)
    red = prepare_reduce(job)
    for work in red["work"]:
        reduce_job_partition(job, work, red["inputs"])
    return finish_count(job, red["inputs"], red["docs"])
