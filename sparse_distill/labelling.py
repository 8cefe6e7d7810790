"""Teacher labelling: texts -> Parquet shards of soft labels (id, probs, logits), planned in a manifest.

Layout (read by users, by other tools and by distillation):
    OUT/manifest.json        the plan (sources, shards) and each shard's state
    OUT/shards/NNNNN.parquet  columns id (string), probs (list<float32>), logits (list<float32>)
Each shard covers a row range of one source file, so the texts are never copied: readers join back by row range.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparse_distill.data import DataError, atomic_write_parquet, atomic_write_text, count_rows, iter_corpus_rows

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CorpusSource:
    """One input file and how to read it."""

    path: str
    text_column: str = "text"
    id_column: str | None = None
    limit: int | None = None


@dataclass
class ShardSpec:
    """A shard of the plan: rows [start, stop) of one source, and its state once labelled."""

    index: int
    source: int
    start: int
    stop: int
    status: str = "pending"
    rows: int = 0
    checksum: str | None = None
    teacher_fingerprint: str | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.index:05d}.parquet"


@dataclass
class LabelManifest:
    """The labelling plan and its progress."""

    sources: list[CorpusSource]
    shard_size: int
    shards: list[ShardSpec] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "sources": [asdict(s) for s in self.sources],
            "shard_size": self.shard_size,
            "shards": [asdict(s) for s in self.shards],
        }

    @classmethod
    def from_json(cls, obj: dict) -> LabelManifest:
        return cls(
            sources=[CorpusSource(**s) for s in obj["sources"]],
            shard_size=int(obj["shard_size"]),
            shards=[ShardSpec(**s) for s in obj["shards"]],
        )

    def save(self, out_dir: str | Path) -> None:
        atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, out_dir: str | Path) -> LabelManifest:
        path = Path(out_dir) / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path}: no labelling manifest here")
        return cls.from_json(json.loads(path.read_text()))

    @property
    def total_rows(self) -> int:
        return sum(s.stop - s.start for s in self.shards)


def plan_shards(sources: list[CorpusSource], shard_size: int) -> LabelManifest:
    """Deterministic plan: each source cut into consecutive row ranges of `shard_size`."""
    shards: list[ShardSpec] = []
    for si, src in enumerate(sources):
        n = count_rows(src.path)
        if src.limit is not None:
            n = min(n, src.limit)
        for start in range(0, n, shard_size):
            shards.append(ShardSpec(index=len(shards), source=si, start=start, stop=min(n, start + shard_size)))
    return LabelManifest(sources=sources, shard_size=shard_size, shards=shards)


def file_checksum(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_texts(manifest: LabelManifest, shard: ShardSpec) -> tuple[list[str], list[str]]:
    """Texts and ids of a shard, read back from its source file."""
    src = manifest.sources[shard.source]
    return iter_corpus_rows(src.path, shard.start, shard.stop, src.text_column, src.id_column)


def soft_label_table(ids: list[str], logits: np.ndarray) -> pa.Table:
    """The shard schema: id (string), probs and logits (list<float32>)."""
    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    k = logits.shape[1]
    as_list = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), pa.float32()), k).cast(  # noqa: E731
        pa.list_(pa.float32())
    )
    return pa.table(
        {"id": pa.array(ids, pa.string()), "probs": as_list(probs.astype(np.float32)), "logits": as_list(logits)}
    )


def label_shard(
    manifest: LabelManifest, shard: ShardSpec, out_dir: str | Path, teacher, teacher_fp: str, batch_size: int = 64
) -> ShardSpec:
    """Label one shard with the teacher and write it atomically; returns the shard's updated record."""
    start = time.perf_counter()
    texts, ids = shard_texts(manifest, shard)
    logits = teacher.predict_logits(texts, batch_size=batch_size)
    path = Path(out_dir) / "shards" / shard.name
    atomic_write_parquet(soft_label_table(ids, logits), path)
    seconds = time.perf_counter() - start
    logger.info(
        "shard %s: %d docs in %.1fs (%.0f docs/s)", shard.name, len(ids), seconds, len(ids) / max(seconds, 1e-9)
    )
    return ShardSpec(
        index=shard.index,
        source=shard.source,
        start=shard.start,
        stop=shard.stop,
        status="done",
        rows=len(ids),
        checksum=file_checksum(path),
        teacher_fingerprint=teacher_fp,
        seconds=seconds,
    )


def shard_is_complete(out_dir: str | Path, shard: ShardSpec, teacher_fp: str) -> bool:
    """A shard counts as done when its file exists with the recorded checksum, row count and teacher."""
    path = Path(out_dir) / "shards" / shard.name
    if shard.status != "done" or shard.teacher_fingerprint != teacher_fp or not path.exists():
        return False
    return shard.checksum == file_checksum(path)


def iter_soft_labels(
    label_dir: str | Path, shard_order: list[int] | None = None, manifest: LabelManifest | None = None
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream (texts, teacher probabilities) shard by shard; ids are checked against the source rows."""
    label_dir = Path(label_dir)
    manifest = manifest or LabelManifest.load(label_dir)
    order = shard_order if shard_order is not None else range(len(manifest.shards))
    for i in order:
        shard = manifest.shards[i]
        if shard.status != "done":
            raise DataError(f"{label_dir / MANIFEST}: shard {shard.name} is {shard.status}; label it before distilling")
        table = pq.read_table(label_dir / "shards" / shard.name, columns=["id", "probs"])
        texts, ids = shard_texts(manifest, shard)
        if table.column("id").to_pylist() != ids:
            raise DataError(
                f"{label_dir / 'shards' / shard.name}: ids do not match rows {shard.start}-{shard.stop} "
                f"of {manifest.sources[shard.source].path}"
            )
        probs = table.column("probs").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
        yield texts, probs
