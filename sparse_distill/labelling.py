"""Teacher labelling: corpus files -> Parquet shards of soft labels (id, probs, logits), planned in a manifest.

Layout (read by users, by other tools and by distillation):
    OUT/manifest.json          the plan (sources, shards) and each shard's state as last collected
    OUT/shards/NNNNN.parquet   columns id (string), probs (list<float32>), logits (list<float32>)
    OUT/shards/NNNNN.json      the shard's own record (done or failed), written after its Parquet file

A shard's worker writes only its two files, each atomically (temporary file, then rename); the manifest is written
only by the process that plans and collects. So a crash at any moment leaves every shard either complete (its
record matches its file's checksum) or redone on the next run, and each document lands in exactly one shard.
Texts are never copied: readers join back to the source by row range.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparse_distill.config import LabelJob
from sparse_distill.corpus import index_rows, read_rows
from sparse_distill.data import DataError, atomic_write_parquet, atomic_write_text, file_checksum

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARDS = "shards"


@dataclass(frozen=True)
class CorpusSource:
    """One input file and how to read it."""

    path: str
    text_column: str = "text"
    id_column: str | None = None
    limit: int | None = None
    id_prefix: str | None = None  # prefix of derived ids (`<prefix>:<row>`); default: the file name


class ShardFiles:
    """The two files of shard `index`: its Parquet data and its JSON record."""

    index: int

    @property
    def name(self) -> str:
        return f"{self.index:05d}.parquet"

    @property
    def record_name(self) -> str:
        return f"{self.index:05d}.json"


@dataclass
class ShardSpec(ShardFiles):
    """A shard of the plan: rows [start, stop) of one source, and its state once labelled or failed."""

    index: int
    source: int
    start: int
    stop: int
    offset: int | None = None  # byte offset of row `start` in a line-format file
    status: str = "pending"
    rows: int = 0
    checksum: str | None = None
    teacher_fingerprint: str | None = None
    input_checksum: str | None = None  # of the shard's ids and texts: which input the labels belong to
    seconds: float = 0.0
    error: str | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class LabelManifest:
    """The labelling plan and its progress."""

    sources: list[CorpusSource]
    shard_size: int
    shards: list[ShardSpec] = field(default_factory=list)
    stamps: list[dict[str, int]] = field(default_factory=list)  # size and mtime of each source when planned

    def to_json(self) -> dict:
        return {
            "sources": [asdict(s) for s in self.sources],
            "shard_size": self.shard_size,
            "stamps": self.stamps,
            "shards": [asdict(s) for s in self.shards],
        }

    @classmethod
    def from_json(cls, obj: dict) -> LabelManifest:
        return cls(
            sources=[CorpusSource(**s) for s in obj["sources"]],
            shard_size=int(obj["shard_size"]),
            shards=[ShardSpec(**s) for s in obj["shards"]],
            stamps=obj.get("stamps", []),
        )

    def save(self, out_dir: str | Path) -> None:
        atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, out_dir: str | Path) -> LabelManifest:
        path = Path(out_dir) / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path}: no labelling manifest here")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a labelling manifest ({e})") from e

    @property
    def total_rows(self) -> int:
        return sum(s.size for s in self.shards)

    def same_plan(self, other: LabelManifest) -> bool:
        """Same sources (and their size and mtime), same shard size: the same shards."""
        return self.same_ranges(other) and self.stamps == other.stamps

    def same_ranges(self, other: LabelManifest) -> bool:
        """Same sources and the same row ranges, though a file may have been edited in place."""
        key = lambda m: [(s.source, s.start, s.stop) for s in m.shards]  # noqa: E731
        return self.sources == other.sources and self.shard_size == other.shard_size and key(self) == key(other)


def read_manifest(out_dir: str | Path) -> LabelManifest:
    """The manifest with shard states brought up to date from the shards' records (finished by a run that died
    before it could save the manifest)."""
    return collect_records(out_dir, LabelManifest.load(out_dir))


def _stamp(path: str) -> dict[str, int]:
    if path.startswith("hub:"):
        return {"size": -1, "mtime_ns": -1}
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def with_id_prefixes(sources: list[CorpusSource]) -> list[CorpusSource]:
    """Give derived ids a prefix unique across the sources: the file name, or the path below the common folder
    when two files share a name (`a/part-0.parquet` and `b/part-0.parquet`)."""
    seen: set[str] = set()
    for s in sources:
        if s.path in seen:
            raise DataError(f"{s.path}: listed twice in the corpus; each document must be labelled once")
        seen.add(s.path)
    names = [Path(s.path).name for s in sources]
    if len(set(names)) == len(names):
        return sources
    common = os.path.commonpath([os.path.abspath(s.path) for s in sources])
    out = []
    for s in sources:
        if s.id_prefix is None and s.id_column is None:
            s = CorpusSource(
                s.path, s.text_column, s.id_column, s.limit, os.path.relpath(os.path.abspath(s.path), common)
            )
        out.append(s)
    return out


def plan_shards(sources: list[CorpusSource], shard_size: int) -> LabelManifest:
    """Deterministic plan: each source cut into consecutive row ranges of `shard_size` (streaming row count)."""
    sources = with_id_prefixes(sources)
    shards: list[ShardSpec] = []
    for si, src in enumerate(sources):
        idx = index_rows(src.path, shard_size, src.limit)
        for k, start in enumerate(range(0, idx.rows, shard_size)):
            offset = idx.offsets[k] if idx.offsets is not None else None
            shards.append(
                ShardSpec(
                    index=len(shards), source=si, start=start, stop=min(idx.rows, start + shard_size), offset=offset
                )
            )
    logger.info("planned %d shards of up to %d docs over %d file(s)", len(shards), shard_size, len(sources))
    return LabelManifest(
        sources=sources, shard_size=shard_size, shards=shards, stamps=[_stamp(s.path) for s in sources]
    )


def open_plan(out_dir: str | Path, sources: list[CorpusSource], shard_size: int, replan: bool = False) -> LabelManifest:
    """The plan for `out_dir`: the existing one when it matches these sources and shard size, else a new one.

    A different plan over an existing output is an error unless `replan` (then stale shard files are removed), so a
    typo in a re-run command never silently mixes two corpora in one directory. The manifest is saved before any
    shard is labelled, and shard states are collected from the shards' own records.
    """
    out_dir = Path(out_dir)
    plan = plan_shards(sources, shard_size)
    try:
        old = LabelManifest.load(out_dir)
    except FileNotFoundError:
        old = None
    if old is not None and old.same_plan(plan):
        plan = old
    elif old is not None and old.same_ranges(plan):
        # A file was edited in place (say, a bad row fixed): keep the shards whose input is unchanged.
        _forget_changed_shards(out_dir, collect_records(out_dir, old), plan)
    elif old is not None:
        if not replan:
            raise DataError(
                f"{out_dir / MANIFEST}: this directory holds labels for another corpus or shard size "
                f"({[s.path for s in old.sources]}, shard size {old.shard_size}, or a source changed since). "
                "Use a new --out, or --replan to discard those labels."
            )
        logger.warning("%s: the corpus or shard size changed; discarding the old shards", out_dir)
        for p in (out_dir / SHARDS).glob("*"):
            p.unlink()
    (out_dir / SHARDS).mkdir(parents=True, exist_ok=True)
    remove_temporaries(out_dir / SHARDS)
    collect_records(out_dir, plan)
    plan.save(out_dir)
    return plan


def input_checksum(ids: list[str], texts: list[str]) -> str:
    """SHA-256 over a shard's ids and texts."""
    h = hashlib.sha256()
    for i, t in zip(ids, texts, strict=True):
        h.update(i.encode())
        h.update(b"\x00")
        h.update(t.encode())
        h.update(b"\x01")
    return h.hexdigest()


def input_unchanged(source: CorpusSource, shard: ShardSpec, checksum: str | None) -> bool:
    """Whether the shard's rows, read now, still have the input checksum recorded when it was done."""
    try:
        texts, ids = read_shard(source, shard)
    except DataError:
        return False
    return input_checksum(ids, texts) == checksum


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files a killed process left in `folder`: never read, since only renamed files count."""
    for p in folder.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def _forget_changed_shards(out_dir: Path, old: LabelManifest, new: LabelManifest) -> None:
    # Read each shard's rows as the new plan finds them (byte offsets move when a line's length changes).
    redo = 0
    for shard, now in zip(old.shards, new.shards, strict=True):
        if shard.status == "done" and not input_unchanged(new.sources[now.source], now, shard.input_checksum):
            (out_dir / SHARDS / shard.record_name).unlink(missing_ok=True)
            redo += 1
    logger.warning(
        "%s: a corpus file changed since planning; %d done shards have new input and will be redone", out_dir, redo
    )


def collect_records(out_dir: str | Path, manifest: LabelManifest) -> LabelManifest:
    """Update the manifest's shard states from the shards' own record files (in place; returns it)."""
    shard_dir = Path(out_dir) / SHARDS
    for i, shard in enumerate(manifest.shards):
        path = shard_dir / shard.record_name
        if not path.exists():
            if shard.status != "pending":
                manifest.shards[i] = _pending(shard)
            continue
        try:
            rec = ShardSpec(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            manifest.shards[i] = _pending(shard)
            continue
        if (rec.index, rec.source, rec.start, rec.stop) == (shard.index, shard.source, shard.start, shard.stop):
            rec.offset = shard.offset  # the plan's offset: the file may have been edited since the record
            manifest.shards[i] = rec
    return manifest


def _pending(shard: ShardSpec) -> ShardSpec:
    return ShardSpec(shard.index, shard.source, shard.start, shard.stop, shard.offset)


def shard_texts(manifest: LabelManifest, shard: ShardSpec) -> tuple[list[str], list[str]]:
    """Texts and ids of a shard, read back from its source file."""
    return read_shard(manifest.sources[shard.source], shard)


def read_shard(src: CorpusSource, shard: ShardSpec) -> tuple[list[str], list[str]]:
    """Texts and ids of rows [shard.start, shard.stop) of `src`."""
    return read_rows(src.path, shard.start, shard.stop, src.text_column, src.id_column, shard.offset, src.id_prefix)


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
    source: CorpusSource, shard: ShardSpec, out_dir: str | Path, teacher, teacher_fp: str, batch_size: int = 64
) -> ShardSpec:
    """Label one shard: read its rows, run the teacher, write the Parquet file, then the shard's record.

    Both writes are atomic and the record comes last, so a record always describes a complete file.
    """
    start = time.perf_counter()
    texts, ids = read_shard(source, shard)
    in_sum = input_checksum(ids, texts)
    logits = teacher.predict_logits(texts, batch_size=batch_size)
    shard_dir = Path(out_dir) / SHARDS
    path = shard_dir / shard.name
    atomic_write_parquet(soft_label_table(ids, logits), path)
    seconds = time.perf_counter() - start
    logger.info(
        "shard %s: %d docs in %.1fs (%.0f docs/s)", shard.name, len(ids), seconds, len(ids) / max(seconds, 1e-9)
    )
    record = ShardSpec(
        index=shard.index,
        source=shard.source,
        start=shard.start,
        stop=shard.stop,
        offset=shard.offset,
        status="done",
        rows=len(ids),
        checksum=file_checksum(path),
        teacher_fingerprint=teacher_fp,
        input_checksum=in_sum,
        seconds=round(seconds, 3),
    )
    atomic_write_text(shard_dir / shard.record_name, json.dumps(asdict(record), indent=2))
    return record


def record_failure(out_dir: str | Path, shard: ShardSpec, error: str) -> ShardSpec:
    """Record a shard that failed (after its retries): its error is kept for `label-status`."""
    record = ShardSpec(shard.index, shard.source, shard.start, shard.stop, shard.offset, status="failed", error=error)
    atomic_write_text(Path(out_dir) / SHARDS / shard.record_name, json.dumps(asdict(record), indent=2))
    return record


def shard_is_complete(out_dir: str | Path, shard: ShardSpec, teacher_fp: str) -> bool:
    """Done for this teacher, with the recorded row count and a file whose checksum matches the record."""
    path = Path(out_dir) / SHARDS / shard.name
    if shard.status != "done" or shard.teacher_fingerprint != teacher_fp or shard.rows != shard.size:
        return False
    return path.exists() and shard.checksum == file_checksum(path)


def pending_shards(out_dir: str | Path, manifest: LabelManifest, teacher_fp: str) -> list[int]:
    """Indices of the shards still to label: missing, partial, corrupt, failed, or made by another teacher."""
    return [s.index for s in manifest.shards if not shard_is_complete(out_dir, s, teacher_fp)]


def label_status(out_dir: str | Path) -> dict[str, Any]:
    """Done / failed / pending counts, rows written, docs/s and each failed shard with its error."""
    out_dir = Path(out_dir)
    manifest = collect_records(out_dir, LabelManifest.load(out_dir))
    by_status: dict[str, list[ShardSpec]] = {"done": [], "failed": [], "pending": []}
    for s in manifest.shards:
        ok = s.status == "done" and (out_dir / SHARDS / s.name).exists()
        by_status["done" if ok else ("failed" if s.status == "failed" else "pending")].append(s)
    done = by_status["done"]
    seconds = sum(s.seconds for s in done)
    return {
        "out": str(out_dir),
        "shards": len(manifest.shards),
        "done": len(done),
        "failed": len(by_status["failed"]),
        "pending": len(by_status["pending"]),
        "rows_total": manifest.total_rows,
        "rows_written": sum(s.rows for s in done),
        "teachers": sorted({s.teacher_fingerprint for s in done if s.teacher_fingerprint}),
        "docs_per_s_per_worker": round(sum(s.rows for s in done) / seconds, 1) if seconds else None,
        "failed_shards": [
            {
                "shard": s.name,
                "source": manifest.sources[s.source].path,
                "rows": f"{s.start}-{s.stop}",
                "error": s.error,
            }
            for s in by_status["failed"]
        ],
    }


def format_status(status: dict[str, Any]) -> str:
    """`label-status` as text."""
    lines = [
        f"{status['out']}: {status['shards']} shards: {status['done']} done, {status['failed']} failed, "
        f"{status['pending']} pending",
        f"rows written: {status['rows_written']:,} of {status['rows_total']:,}",
    ]
    if status["docs_per_s_per_worker"]:
        lines.append(f"teacher speed: {status['docs_per_s_per_worker']:,} docs/s per worker")
    for f in status["failed_shards"]:
        lines.append(f"FAILED {f['shard']} ({f['source']} rows {f['rows']}): {f['error']}")
    return "\n".join(lines)


_LOCAL = threading.local()


def cached_teacher(model_dir: str, max_length: int, precision: str = "auto", quantize_int8: bool = False):
    """The teacher for this worker thread, loaded once: a Dask or pool worker labels many shards.

    One copy per thread, because a fast tokenizer must not be used by two threads at once. On a machine with GPUs
    each worker takes one: Dask workers by their number, threads by the order they first ask.
    """
    from sparse_distill.teacher import TeacherPredictor

    key = (model_dir, max_length, precision, quantize_int8)
    cache = getattr(_LOCAL, "teachers", None)
    if cache is None:
        cache = _LOCAL.teachers = {}
    if key not in cache:
        cache[key] = TeacherPredictor(
            model_dir, max_length=max_length, device=worker_device(), precision=precision, quantize_int8=quantize_int8
        )
    return cache[key]


_SLOTS = {"next": 0}
_SLOTS_LOCK = threading.Lock()


def worker_device() -> str:
    """'cpu', or 'cuda:K' with one GPU per worker."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    n = torch.cuda.device_count()
    try:
        from distributed import get_worker

        name = get_worker().name
        if isinstance(name, int):
            return f"cuda:{name % n}"
    except (ImportError, ValueError):
        pass
    slot = getattr(_LOCAL, "slot", None)
    if slot is None:
        with _SLOTS_LOCK:
            slot = _LOCAL.slot = _SLOTS["next"]
            _SLOTS["next"] += 1
    return f"cuda:{slot % n}"


def iter_soft_labels(
    label_dir: str | Path, shard_order: list[int] | None = None, manifest: LabelManifest | None = None
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream (texts, teacher probabilities) shard by shard; ids are checked against the source rows."""
    label_dir = Path(label_dir)
    manifest = manifest or read_manifest(label_dir)
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


# --- a whole labelling job: what the CLI, the flow and the pipeline share ------------------------------------------


def job_sources(job: LabelJob) -> list[CorpusSource]:
    """The job's corpus files (globs expanded, sorted) as sources."""
    from sparse_distill.data import expand_paths

    return [CorpusSource(p, job.text_column, job.id_column, job.limit) for p in expand_paths(job.corpus)]


def job_max_length(job: LabelJob) -> int:
    return job.label.max_length or job.max_length


def prepare_job(job: LabelJob) -> dict[str, Any]:
    """Plan (or reopen) the job's output and list the shards still to label; returns a small manifest."""
    from sparse_distill.teacher import teacher_fingerprint

    if not Path(job.teacher).is_dir():
        raise DataError(f"{job.teacher}: teacher folder not found")
    plan = open_plan(job.out, job_sources(job), job.label.shard_size, job.replan)
    teacher_fp = teacher_fingerprint(job.teacher)
    pending = pending_shards(job.out, plan, teacher_fp)
    todo = set(pending)
    done_rows = sum(s.rows for s in plan.shards if s.index not in todo)
    logger.info(
        "%s: %d shards, %d to label (%d of %d docs already done)",
        job.out,
        len(plan.shards),
        len(pending),
        done_rows,
        plan.total_rows,
    )
    return {
        "out": str(Path(job.out).resolve()),
        "teacher_fingerprint": teacher_fp,
        "shards": len(plan.shards),
        "pending": pending,
        # What each pending shard's worker needs, so no worker reads the (large) manifest.
        "work": [
            {"shard": asdict(plan.shards[i]), "source": asdict(plan.sources[plan.shards[i].source])} for i in pending
        ],
        "rows_total": plan.total_rows,
        "rows_done": done_rows,
    }


def label_job_shard(job: LabelJob, work: dict[str, Any], teacher_fp: str) -> dict[str, Any]:
    """Label one pending shard (an item of `prepare_job`'s `work`) on this worker; returns its record.

    The teacher is loaded once per worker.
    """
    teacher = cached_teacher(job.teacher, job_max_length(job), job.label.precision, job.label.quantize_int8)
    shard, source = ShardSpec(**work["shard"]), CorpusSource(**work["source"])
    return asdict(label_shard(source, shard, job.out, teacher, teacher_fp, job.label.batch_size))


def fail_job_shard(job: LabelJob, work: dict[str, Any], error: str) -> dict[str, Any]:
    """Record a pending shard (an item of `prepare_job`'s `work`) as failed with its error."""
    return asdict(record_failure(job.out, ShardSpec(**work["shard"]), error))


def finish_job(job: LabelJob) -> dict[str, Any]:
    """Collect the shards' records into the manifest; returns `label_status`."""
    manifest = read_manifest(job.out)
    manifest.save(job.out)
    return label_status(job.out)


def run_label_job(job: LabelJob, progress: Any = None) -> dict[str, Any]:
    """The whole job in this process, shard after shard (no Prefect): plan, label what is pending, collect.

    A shard that fails is recorded and the others go on; the returned status lists the failures.
    `progress(rows_done, rows_total)` is called after each shard.
    """
    prep = prepare_job(job)
    done = prep["rows_done"]
    for work in prep["work"]:
        try:
            done += label_job_shard(job, work, prep["teacher_fingerprint"])["rows"]
        except Exception as e:  # noqa: BLE001 - a bad shard is recorded, the others go on
            logger.error("shard %05d failed: %s", work["shard"]["index"], e)
            fail_job_shard(job, work, f"{type(e).__name__}: {e}")
        if progress:
            progress(done, prep["rows_total"])
    return {**finish_job(job), "teacher_fingerprint": prep["teacher_fingerprint"]}
