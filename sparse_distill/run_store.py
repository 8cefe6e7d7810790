"""The run store: where a run keeps each stage's outputs, what they were made from, and whether they are fresh.

A run directory holds one folder per stage (`STAGE_DIRS`). A stage (or an experiment's variant, in its own folder)
finishes by writing `result.json` once: its record, with the fingerprint it was made for, the stage's name and the
library version. The one freshness rule: a stage is fresh when that record exists and carries the same fingerprint.
Fingerprints are built from `config.fingerprint` and, for input files, from `content_fingerprint` (the data's bytes:
the pipeline's stage keys) or `file_fingerprint` (path, size, mtime: stamps of the run's own files) below; every
cache key in the project (the stages', the experiments', the shard plans' stamps) goes through these.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sparse_distill import __version__
from sparse_distill.config import fingerprint
from sparse_distill.data import atomic_write_parquet, atomic_write_text

logger = logging.getLogger(__name__)

RESULT = "result.json"

# Stage name -> folder under the run directory.
STAGE_DIRS = {
    "holdout": "holdout",
    "sentences": "sentences",
    "teacher_length": "teacher_length",
    "teacher": "teacher",
    "label_train": "labels/train",
    "label_corpus": "labels/corpus",
    "vocab": "vocab",
    "transfer": "transfer",
    "label_transfer": "labels/transfer",
    "transfer_hard": "transfer_hard",
    "label_transfer_hard": "labels/transfer_hard",
    "distill": "students/kd",
    "kdft": "students/kdft",
    "scratch": "students/scratch",
    "evaluate": "evaluation",
}


# --- fingerprints --------------------------------------------------------------------------------------------------


def file_fingerprint(path: str) -> dict[str, Any]:
    """Identity of an input file without reading it all: absolute path, size and modification time.

    A `hub:` dataset has no local file: its name is all there is.
    """
    if path.startswith("hub:"):
        return {"path": path}
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def digest_cache_dir() -> Path:
    """Where content digests of input files are kept between runs: `$SPARSE_DISTILL_CACHE`, else
    `~/.cache/sparse-distill`, under `digests/`."""
    root = os.environ.get("SPARSE_DISTILL_CACHE") or Path.home() / ".cache" / "sparse-distill"
    return Path(root) / "digests"


# Digests already looked up by this process, by file stamp: every stage's key fingerprints the same input files.
_DIGESTS: dict[str, str] = {}


def _file_digest(path: str) -> str:
    """blake2b of a file's bytes, read once per version of the file: the digest is kept in `digest_cache_dir()` under
    the file's path, size, modification time and inode, so an unchanged file is not read again."""
    st = os.stat(path)
    stamp = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if stamp in _DIGESTS:
        return _DIGESTS[stamp]
    cached = digest_cache_dir() / hashlib.sha256(stamp.encode()).hexdigest()[:32]
    try:
        _DIGESTS[stamp] = cached.read_text().strip()
        return _DIGESTS[stamp]
    except OSError:
        pass
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    digest = _DIGESTS[stamp] = h.hexdigest()
    try:
        atomic_write_text(cached, digest)
    except OSError as e:  # a read-only home only costs reading the file again next time
        logger.warning("%s: digest not cached (%s)", path, e)
    return digest


def content_fingerprint(path: str) -> dict[str, Any]:
    """Identity of an input file (or folder of files, such as a saved `datasets` folder) by its bytes, not its path
    or modification time: a data set copied, moved or re-synced unchanged keeps its stages' cache keys, so a teacher is
    not trained again for it; any changed byte changes the key. A `hub:` dataset has no local file: its name is all
    there is."""
    if path.startswith("hub:"):
        return {"path": path}
    if os.path.isdir(path):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        return {"files": [[str(f.relative_to(path)), f.stat().st_size, _file_digest(str(f))] for f in files]}
    return {"size": os.stat(path).st_size, "blake2b": _file_digest(path)}


def label_dir_fingerprint(label_dir: str | Path) -> dict[str, Any]:
    """Which soft labels a labelling folder holds: the shards' checksums and the teachers that made them."""
    # Imported here: the shard plan (under soft_labels) imports this module for its file stamps.
    from sparse_distill.soft_labels import read_manifest

    m = read_manifest(label_dir)
    shards = sorted({(s.checksum, s.teacher_fingerprint) for s in m.shards}, key=str)
    return {"dir": str(Path(label_dir).resolve()), "rows": m.total_rows, "shards": fingerprint(shards)}


def stage_key(run_dir: str | Path, stage: str, stage_fingerprint: str) -> str:
    """The cache key of a stage in a run directory: its fingerprint and the directory (two runs never share one)."""
    digest = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    return f"sparse-distill-{stage}-{stage_fingerprint}-{digest}"


# --- records -------------------------------------------------------------------------------------------------------


def resolve_run_dir(name: str, run_dir: str | Path | None) -> str:
    """The run directory of a pipeline run: `run_dir`, or `runs/<name>`, absolute."""
    return str(Path(run_dir or Path("runs") / name).resolve())


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """The folder of a pipeline stage in a run directory."""
    return Path(run_dir) / STAGE_DIRS[stage]


def write_result(folder: str | Path, stage: str, stage_fingerprint: str, record: dict[str, Any]) -> dict[str, Any]:
    """Record a finished stage (or variant) in `folder/result.json`, atomically and once; returns the record."""
    record = {**record, "fingerprint": stage_fingerprint, "stage": stage, "library_version": __version__}
    atomic_write_text(Path(folder) / RESULT, json.dumps(record, indent=2, default=str))
    return record


def read_result(folder: str | Path) -> dict[str, Any] | None:
    """The record of `folder`, or None when nothing finished there."""
    path = Path(folder) / RESULT
    return json.loads(path.read_text()) if path.exists() else None


def read_stage(run_dir: str | Path, stage: str) -> dict[str, Any] | None:
    """The record of a pipeline stage in a run directory, or None when it has not finished there."""
    return read_result(stage_dir(run_dir, stage))


# --- freshness: the one decision ----------------------------------------------------------------------------------


def is_current(record: dict[str, Any] | None, stage_fingerprint: str) -> bool:
    """The freshness rule: a record exists and was made for this fingerprint."""
    return record is not None and record.get("fingerprint") == stage_fingerprint


def fresh_stage(
    run_dir: str | Path, stage: str, stage_fingerprint: str, teacher_fingerprint: str | None = None
) -> dict[str, Any] | None:
    """The record of a pipeline stage when its outputs in the run directory are fresh, else None.

    Fresh: made for this fingerprint, in this folder (a record copied with its run folder names the old folder's
    files), and, where `teacher_fingerprint` is given (labels), by that teacher's weights: a teacher trained again
    under the same key has other weights, and the old labels would be refused later.
    """
    record = read_stage(run_dir, stage)
    if record is None or not is_current(record, stage_fingerprint):
        return None
    made_here = "out_dir" not in record or Path(record["out_dir"]).resolve() == stage_dir(run_dir, stage).resolve()
    by_teacher = teacher_fingerprint is None or record.get("teacher_fingerprint") == teacher_fingerprint
    return record if made_here and by_teacher else None


def is_fresh(run_dir: str | Path, stage: str, stage_fingerprint: str, teacher_fingerprint: str | None = None) -> bool:
    """Whether a pipeline stage is fresh (`fresh_stage`)."""
    return fresh_stage(run_dir, stage, stage_fingerprint, teacher_fingerprint) is not None


def fresh_result(folder: str | Path, stage_fingerprint: str) -> dict[str, Any] | None:
    """The record of `folder` when it is fresh for this fingerprint, else None."""
    record = read_result(folder)
    return record if is_current(record, stage_fingerprint) else None


def cached(
    folder: str | Path, stage: str, stage_fingerprint: str, compute: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """A record read back when `folder` holds a fresh one, else computed (into `folder`) and written."""
    folder = Path(folder)
    done = fresh_result(folder, stage_fingerprint)
    if done is not None:
        logger.info("%s: done already (fingerprint %s)", folder.name, stage_fingerprint)
        return done
    folder.mkdir(parents=True, exist_ok=True)
    return write_result(folder, stage, stage_fingerprint, compute())


# --- a fingerprinted table: one file that is its own record -------------------------------------------------------

_FP_KEY = b"fingerprint"


def read_fresh_table(path: str | Path, stage_fingerprint: str) -> pa.Table | None:
    """A Parquet file written by `write_table` for this fingerprint, else None."""
    path = Path(path)
    if not path.exists():
        return None
    table = pq.read_table(path)
    record = {"fingerprint": (table.schema.metadata or {}).get(_FP_KEY, b"").decode()}
    return table if is_current(record, stage_fingerprint) else None


def write_table(table: pa.Table, path: str | Path, stage_fingerprint: str) -> Path:
    """Write a Parquet file atomically with its fingerprint in the schema metadata."""
    return atomic_write_parquet(table.replace_schema_metadata({_FP_KEY: stage_fingerprint}), path)
