"""The soft-label format: what labelling writes and distillation (or any other tool) reads.

A labelling output folder OUT (a shard plan, see `sparse_distill.shard_plan`):
    OUT/manifest.json          the plan (sources, shards) and each shard's state as last collected
    OUT/shards/NNNNN.parquet   columns id (string), probs (list<float32>), logits (list<float32>)
    OUT/shards/NNNNN.json      the shard's record (done or failed), written after its Parquet file

Texts are never copied: readers join back to the source by row range, and the ids are checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparse_distill.data import DataError, atomic_write_parquet
from sparse_distill.shard_plan import MANIFEST, PlanKind, ShardPlan, ShardRecord, collect_records, read_shard

SHARDS = "shards"
SCHEMA = pa.schema([("id", pa.string()), ("probs", pa.list_(pa.float32())), ("logits", pa.list_(pa.float32()))])


@dataclass
class LabelRecord(ShardRecord):
    """A labelled shard: its rows, the checksum of its Parquet file and the teacher that labelled it."""

    rows: int = 0
    checksum: str | None = None
    teacher_fingerprint: str | None = None
    # How the teacher was run (`labelling.label_settings`); None in records made before it was recorded.
    settings: dict[str, Any] | None = None


LABELLING = PlanKind(name="labelling", outputs="labels", records=SHARDS, record_type=LabelRecord, manifest_states=True)


def soft_label_table(ids: list[str], logits: np.ndarray) -> pa.Table:
    """A shard's table (`SCHEMA`): the ids, the softmax of the logits and the logits, as float32."""
    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    k = logits.shape[1]
    as_list = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), pa.float32()), k).cast(  # noqa: E731
        pa.list_(pa.float32())
    )
    return pa.table(
        {"id": pa.array(ids, pa.string()), "probs": as_list(probs.astype(np.float32)), "logits": as_list(logits)},
        schema=SCHEMA,
    )


def write_soft_labels(path: str | Path, ids: list[str], logits: np.ndarray) -> Path:
    """Write a shard's soft labels atomically."""
    return atomic_write_parquet(soft_label_table(ids, logits), path)


def read_soft_labels(path: str | Path) -> tuple[list[str], np.ndarray]:
    """A shard's ids and probabilities (rows x classes, float32)."""
    table = pq.read_table(path, columns=["id", "probs"])
    ids = table.column("id").to_pylist()
    return ids, table.column("probs").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)


def read_manifest(label_dir: str | Path) -> ShardPlan:
    """The plan of a labelling folder with each shard's state read from its record (so a run that died before it
    could save the manifest still counts its finished shards)."""
    return collect_records(label_dir, LABELLING, ShardPlan.load(label_dir, LABELLING))


def iter_soft_labels(
    label_dir: str | Path, shard_order: list[int] | None = None, manifest: ShardPlan | None = None
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream (texts, teacher probabilities) shard by shard; ids are checked against the source rows."""
    label_dir = Path(label_dir)
    manifest = manifest or read_manifest(label_dir)
    order = shard_order if shard_order is not None else range(len(manifest.shards))
    for i in order:
        shard = manifest.shards[i]
        status = getattr(shard, "status", "pending")
        if status != "done":
            raise DataError(f"{label_dir / MANIFEST}: shard {shard.name} is {status}; label it before distilling")
        path = label_dir / SHARDS / shard.name
        ids, probs = read_soft_labels(path)
        texts, source_ids = read_shard(manifest.sources[shard.source], shard)
        if ids != source_ids:
            raise DataError(
                f"{path}: ids do not match rows {shard.start}-{shard.stop} of {manifest.sources[shard.source].path}"
            )
        yield texts, probs
