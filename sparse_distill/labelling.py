"""Teacher labelling: corpus files -> Parquet shards of soft labels, planned in a shard plan, resumable.

The folder's layout and the soft-label format are in `sparse_distill.soft_labels`; planning, resuming and the
record files in `sparse_distill.shard_plan`. This module labels a shard, and runs a whole job: plan, label what is
pending, collect the shards' records into the manifest.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sparse_distill.config import LabelJob
from sparse_distill.data import DataError, expand_paths, file_checksum
from sparse_distill.shard_plan import (
    CorpusSource,
    ShardPlan,
    ShardSpec,
    input_checksum,
    open_plan,
    pending_work,
    read_shard,
    record_failure,
    record_failure_if_possible,
    run_pending,
    work_item,
    write_record,
)
from sparse_distill.soft_labels import LABELLING, SHARDS, LabelRecord, read_manifest, write_soft_labels

logger = logging.getLogger(__name__)


def label_shard(
    source: CorpusSource,
    shard: ShardSpec,
    out_dir: str | Path,
    teacher,
    teacher_fp: str,
    batch_size: int = 64,
    settings: dict[str, Any] | None = None,
) -> LabelRecord:
    """Label one shard: read its rows, run the teacher, write the Parquet file, then the shard's record (with the
    teacher's fingerprint and `settings`, how it was run: see `label_settings`).

    Both writes are atomic and the record comes last, so a record always describes a complete file.
    """
    start = time.perf_counter()
    texts, ids = read_shard(source, shard)
    in_sum = input_checksum(ids, texts)
    logits = teacher.predict_logits(texts, batch_size=batch_size)
    path = write_soft_labels(Path(out_dir) / SHARDS / shard.name, ids, logits)
    seconds = time.perf_counter() - start
    logger.info(
        "shard %s: %d docs in %.1fs (%.0f docs/s)", shard.name, len(ids), seconds, len(ids) / max(seconds, 1e-9)
    )
    record = LabelRecord(
        **asdict(shard.spec()),
        status="done",
        rows=len(ids),
        checksum=file_checksum(path),
        teacher_fingerprint=teacher_fp,
        settings=settings,
        input_checksum=in_sum,
        seconds=round(seconds, 3),
    )
    return write_record(out_dir, LABELLING, record)


def shard_is_complete(
    out_dir: str | Path, shard: ShardSpec, teacher_fp: str, settings: dict[str, Any] | None = None
) -> bool:
    """Done for this teacher run with these `settings` (None: any), with the recorded row count and a file whose
    checksum matches the record. A record made before settings were recorded counts as made with them."""
    if not isinstance(shard, LabelRecord) or shard.status != "done" or shard.teacher_fingerprint != teacher_fp:
        return False
    if settings is not None and shard.settings is not None and shard.settings != settings:
        return False
    path = Path(out_dir) / SHARDS / shard.name
    return shard.rows == shard.size and path.exists() and shard.checksum == file_checksum(path)


def pending_shards(
    out_dir: str | Path, manifest: ShardPlan, teacher_fp: str, settings: dict[str, Any] | None = None
) -> list[int]:
    """Indices of the shards still to label: missing, partial, corrupt, failed, or made by another teacher or with
    other `settings` (None: not checked)."""
    return [s.index for s in manifest.shards if not shard_is_complete(out_dir, s, teacher_fp, settings)]


def label_status(out_dir: str | Path) -> dict[str, Any]:
    """Done / failed / pending counts, rows written, docs/s and each failed shard with its error."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    by_status: dict[str, list[Any]] = {"done": [], "failed": [], "pending": []}  # of LabelRecords
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


# --- a whole labelling job: what the CLI, the flow and the pipeline share ------------------------------------------


def job_sources(job: LabelJob) -> list[CorpusSource]:
    """The job's corpus files (globs expanded, sorted) as sources."""
    return [CorpusSource(p, job.text_column, job.id_column, job.limit) for p in expand_paths(job.corpus)]


def job_max_length(job: LabelJob) -> int:
    return job.label.max_length or job.max_length


def label_settings(job: LabelJob) -> dict[str, Any]:
    """What the soft labels depend on besides the teacher's weights and the input: its truncation and numerics. A
    shard labelled with other settings is labelled again."""
    return {"max_length": job_max_length(job), "precision": job.label.precision, "int8": job.label.quantize_int8}


def prepare_job(job: LabelJob) -> dict[str, Any]:
    """Plan (or reopen) the job's output and list the shards still to label; returns a small manifest."""
    from sparse_distill.teacher import teacher_fingerprint

    if not Path(job.teacher).is_dir():
        raise DataError(f"{job.teacher}: teacher folder not found")
    plan = open_plan(job.out, LABELLING, job_sources(job), job.label.shard_size, job.replan)
    teacher_fp = teacher_fingerprint(job.teacher)
    pending = pending_shards(job.out, plan, teacher_fp, label_settings(job))
    return {**pending_work(job.out, plan, pending), "teacher_fingerprint": teacher_fp}


def label_job_shard(job: LabelJob, work: dict[str, Any], teacher_fp: str) -> dict[str, Any]:
    """Label one pending shard (an item of `prepare_job`'s `work`) on this worker; returns its record.

    The teacher is loaded once per worker.
    """
    source, shard = work_item(work)
    try:
        teacher = cached_teacher(job.teacher, job_max_length(job), job.label.precision, job.label.quantize_int8)
        record = label_shard(source, shard, job.out, teacher, teacher_fp, job.label.batch_size, label_settings(job))
        return asdict(record)
    except Exception as e:
        # Recorded here, on the worker (a full disk, a bad row): `label-status` reports it even if the flow dies.
        record_failure_if_possible(job.out, LABELLING, shard, e)
        raise


def fail_job_shard(job: LabelJob, work: dict[str, Any], error: str) -> dict[str, Any]:
    """Record a pending shard (an item of `prepare_job`'s `work`) as failed with its error."""
    return asdict(record_failure(job.out, LABELLING, work_item(work)[1], error))


def finish_job(job: LabelJob) -> dict[str, Any]:
    """Collect the shards' records into the manifest; returns `label_status`."""
    try:
        read_manifest(job.out).save(job.out)
    except OSError as e:  # the records hold the truth; the manifest's copy of the states is only for readers
        logger.error("%s: could not save the manifest: %s", job.out, e)
    return label_status(job.out)


def run_label_job(job: LabelJob, progress: Any = None) -> dict[str, Any]:
    """The whole job in this process, shard after shard (no Prefect): plan, label what is pending, collect.

    A shard that fails is recorded and the others go on; the returned status lists the failures.
    `progress(rows_done, rows_total)` is called after each shard.
    """
    prep = prepare_job(job)
    fp = prep["teacher_fingerprint"]
    run_pending(prep, lambda w: label_job_shard(job, w, fp), lambda w, e: fail_job_shard(job, w, e), progress)
    return {**finish_job(job), "teacher_fingerprint": fp}
