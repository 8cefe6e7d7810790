"""Featurise once: the n-gram ids of every labelled document, stored beside its soft labels and reused by every epoch.

Distillation reads the same soft-label shards pass after pass; featurising their texts again each time costs as much
CPU as a large share of the training step. `featurize_labels` writes, for one labelling folder and one vocabulary,

    OUT/shards/NNNNN.parquet   column ids (list<int32>): row r = the n-gram ids of row r of label shard NNNNN
    OUT/shards/NNNNN.json      the shard's record: the vocabulary's and the label shard's checksums, rows

Shard by shard, atomically, and resumable: a shard whose record names the same vocabulary and label shard is kept,
any other is (re)done, so a killed run loses at most the shard it was writing and a changed vocabulary or relabelled
shard is never read with stale ids. `iter_featurized` streams (ids, offsets, probabilities) back with bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparse_distill.data import DataError, atomic_write_parquet, atomic_write_text, file_checksum
from sparse_distill.shard_plan import ShardPlan, read_shard
from sparse_distill.soft_labels import SHARDS, read_manifest, read_soft_labels
from sparse_distill.vocab import NgramVocab

logger = logging.getLogger(__name__)

FEATURES_SCHEMA = pa.schema([("ids", pa.list_(pa.int32()))])
FORMAT = 1


@dataclass(frozen=True)
class FeatureRecord:
    """What one feature shard was made from."""

    shard: int
    rows: int
    vocab_checksum: str
    label_checksum: str | None
    format: int = FORMAT


def _record_path(out_dir: Path, index: int) -> Path:
    return out_dir / SHARDS / f"{index:05d}.json"


def _read_record(out_dir: Path, index: int) -> FeatureRecord | None:
    try:
        return FeatureRecord(**json.loads(_record_path(out_dir, index).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def vocab_checksum(vocab_dir: str | Path) -> str:
    """The identity of a vocabulary: the checksum of its `vocab.parquet` (row i = embedding row i), and its subwords
    when it has them (they add ids to every document)."""
    checksum = file_checksum(Path(vocab_dir) / "vocab.parquet")
    subwords = json.loads((Path(vocab_dir) / "vocab.json").read_text()).get("subwords")
    if not subwords:
        return checksum  # as before subwords existed, so older feature shards stay valid
    return hashlib.sha256(f"{checksum}:{json.dumps(subwords, sort_keys=True)}".encode()).hexdigest()


def _labelled(label_dir: Path, plan: ShardPlan, index: int, vsum: str) -> FeatureRecord:
    """The record a feature shard made from label shard `index` with vocabulary `vsum` carries; raises when that shard
    is not labelled yet."""
    shard = plan.shards[index]
    if getattr(shard, "status", "pending") != "done":
        raise DataError(f"{label_dir}: shard {shard.name} is not labelled yet; label it before featurising")
    return FeatureRecord(index, shard.size, vsum, getattr(shard, "checksum", None))


def pending_feature_shards(
    label_dir: str | Path,
    vocab_dir: str | Path,
    out_dir: str | Path,
    vsum: str | None = None,
    plan: ShardPlan | None = None,
) -> list[int]:
    """The label shards of `label_dir` whose features in `out_dir` are missing or were made from another vocabulary or
    other labels: the work `featurize_shard` still has to do. Raises when a label shard is not labelled yet.

    `vsum` (the vocabulary's `vocab_checksum`) and `plan` (the label folder's manifest) spare a caller that already has
    them hashing the vocabulary and reading the manifest again."""
    label_dir, out_dir = Path(label_dir), Path(out_dir)
    plan = plan or read_manifest(label_dir)
    vsum = vsum or vocab_checksum(vocab_dir)
    pending = []
    for i, shard in enumerate(plan.shards):
        wanted = _labelled(label_dir, plan, i, vsum)
        if _read_record(out_dir, i) != wanted or not (out_dir / SHARDS / shard.name).exists():
            pending.append(i)
    return pending


def featurize_shard(
    label_dir: str | Path, vocab: NgramVocab, vsum: str, out_dir: str | Path, index: int, plan: ShardPlan | None = None
) -> FeatureRecord:
    """Write the n-gram ids of label shard `index` (row r = the ids of row r) and its record, atomically.

    `vsum` is the vocabulary's `vocab_checksum`; `plan` the label folder's manifest when the caller has it. Any worker
    may run this for any shard: shards share nothing.
    """
    label_dir, out_dir = Path(label_dir), Path(out_dir)
    plan = plan or read_manifest(label_dir)
    shard = plan.shards[index]
    record = _labelled(label_dir, plan, index, vsum)
    texts, _ = read_shard(plan.sources[shard.source], shard)
    ids, offsets = vocab.featurize(texts, engine="compiled")
    bounds = np.append(offsets, len(ids)).astype(np.int32)
    column = pa.ListArray.from_arrays(pa.array(bounds), pa.array(ids.astype(np.int32)))
    (out_dir / SHARDS).mkdir(parents=True, exist_ok=True)
    # Data first, record last: a record always describes a whole file.
    _record_path(out_dir, index).unlink(missing_ok=True)
    atomic_write_parquet(pa.table({"ids": column}, schema=FEATURES_SCHEMA), out_dir / SHARDS / shard.name)
    atomic_write_text(_record_path(out_dir, index), json.dumps(record.__dict__))
    return record


def featurize_labels(label_dir: str | Path, vocab_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the n-gram ids of every row of a labelling folder's shards to `out_dir` (see the module docstring);
    shards already done for this vocabulary and these labels are kept. Returns `out_dir`.

    This runs the shards one after another; the pipeline fans `featurize_shard` out over its task runner first when
    labelling runs on several workers, and this then only checks that every shard is there."""
    label_dir, out_dir = Path(label_dir), Path(out_dir)
    (out_dir / SHARDS).mkdir(parents=True, exist_ok=True)
    plan, vsum = read_manifest(label_dir), vocab_checksum(vocab_dir)
    shards = plan.shards
    pending = pending_feature_shards(label_dir, vocab_dir, out_dir, vsum, plan)
    if pending:
        vocab = NgramVocab.load(vocab_dir)
        start, docs = time.perf_counter(), 0
        for n, i in enumerate(pending, 1):
            docs += featurize_shard(label_dir, vocab, vsum, out_dir, i, plan).rows
            logger.info(
                "%s: featurised shard %d (%d/%d to do, %d docs, %.0f docs/s so far)",
                out_dir,
                i,
                n,
                len(pending),
                shards[i].size,
                docs / max(time.perf_counter() - start, 1e-9),
            )
    logger.info("%s: %d shards featurised, %d kept from before", out_dir, len(pending), len(shards) - len(pending))
    return out_dir


def iter_featurized(
    label_dir: str | Path, feature_dir: str | Path, shard_order: list[int] | None = None, plan: ShardPlan | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stream (ids int64, per-document offsets int64, teacher probabilities) shard by shard; each feature shard is
    checked against its label shard (row count and the label checksum it was made from)."""
    label_dir, feature_dir = Path(label_dir), Path(feature_dir)
    plan = plan or read_manifest(label_dir)
    for i in shard_order if shard_order is not None else range(len(plan.shards)):
        shard = plan.shards[i]
        record = _read_record(feature_dir, i)
        if record is None or record.rows != shard.size or record.label_checksum != getattr(shard, "checksum", None):
            raise DataError(
                f"{feature_dir / SHARDS / shard.name}: missing or made from other labels than "
                f"{label_dir / SHARDS / shard.name}; run featurize_labels again"
            )
        _, probs = read_soft_labels(label_dir / SHARDS / shard.name)
        column = pq.read_table(feature_dir / SHARDS / shard.name).column("ids").combine_chunks()
        if len(column) != len(probs):
            raise DataError(f"{feature_dir / SHARDS / shard.name}: {len(column)} rows, its labels have {len(probs)}")
        bounds = column.offsets.to_numpy().astype(np.int64)
        ids = column.values.to_numpy().astype(np.int64)[bounds[0] : bounds[-1]]
        yield ids, bounds[:-1] - bounds[0], probs
