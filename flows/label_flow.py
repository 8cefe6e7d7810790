"""Corpus labelling as a Prefect flow: plan, fan the shards out over a task runner, collect, report failures."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.fanout import Progress, fan_out
from sparse_distill.config import LabelConfig, LabelJob
from sparse_distill.labelling import format_status
from sparse_distill.locks import folder_lock
from sparse_distill.shard_plan import work_rows
from sparse_distill.tracking import TrackingRef
from tasks import labelling as t


class LabellingFailed(RuntimeError):
    """Some shards failed after their retries; the others are complete."""


def _torch_threads(cfg: LabelConfig) -> int | None:
    # Local workers split this machine's cores; workers of a remote cluster keep their own default.
    if cfg.runner == "dask" and cfg.dask_address:
        return None
    return max(1, (os.cpu_count() or 1) // cfg.workers)


def _tracking_run(job: LabelJob, tracking: TrackingRef | None, run_name: str):
    """A nested MLflow run under the pipeline's parent, or a run of its own when the job asks for tracking."""
    from sparse_distill.tracking import stage_run

    if tracking is None and job.tracking is not None:
        from pathlib import Path

        from sparse_distill.mlflow_model import ensure_experiment, resolve_tracking_uri
        from sparse_distill.tracking import start_parent_run

        uri = resolve_tracking_uri(job.tracking.tracking_uri, Path.cwd())
        exp = ensure_experiment(job.tracking.experiment, uri, Path.cwd() / "mlartifacts")
        parent = start_parent_run(uri, exp, f"label {Path(job.out).name}", {}, {"sparse_distill.out": job.out})
        tracking = TrackingRef(uri, exp, parent)
    return stage_run(tracking, run_name, {"label": job.label.model_dump(mode="json"), "corpus": job.corpus}), tracking


@flow(name="label-corpus")
def label_corpus_flow(job: LabelJob, tracking: TrackingRef | None = None, run_name: str = "label") -> dict[str, Any]:
    """Label a corpus with a teacher into `job.out`, resuming: only missing, corrupt or failed shards are labelled.

    Shards run on this flow's task runner (see `make_task_runner`). A shard that still fails after its retries is
    recorded with its error and the others go on; the flow then ends Failed, naming the shards.
    """
    with folder_lock(job.out):  # one writer per output folder (re-entrant: the caller may hold it already)
        prep = t.plan_labelling(job)
        fp = prep["teacher_fingerprint"]
        progress = Progress(f"Labelling into {job.out}", prep["rows_done"], prep["rows_total"], "labelled", "docs")
        shard_task = t.label_shard.with_options(retries=job.label.retries)
        threads = _torch_threads(job.label)
        run_ctx, ref = _tracking_run(job, tracking, run_name)
        with run_ctx as sr:

            def log_speed(work: dict[str, Any], record: dict[str, Any]) -> None:
                if sr:
                    sr.log_metrics(record["index"], {"docs_per_s": record["rows"] / max(record["seconds"], 1e-9)})

            failures = fan_out(
                shard_task,
                prep["work"],
                lambda work: (job, work, fp, threads),
                progress,
                weight=work_rows,
                on_success=log_speed,
                on_failure=lambda work, error: t.record_failed_shard(job, work, error),
            )
            failed = [work["shard"]["index"] for work, _ in failures]
            status = t.collect_labels(job)
            if sr:
                sr.log_metrics(0, {"rows_written": status["rows_written"], "shards_failed": status["failed"]})
        if tracking is None and ref is not None:
            from sparse_distill.tracking import end_run

            end_run(ref.tracking_uri, ref.parent_run_id, "FAILED" if failed else "FINISHED")
        create_markdown_artifact(
            "```\n" + format_status(status) + "\n```", description=f"Labelling status of {job.out}"
        )
    if failed:
        names = ", ".join(f"{i:05d}" for i in sorted(failed))
        raise LabellingFailed(
            f"{len(failed)} of {prep['shards']} shards failed ({names}); the others are complete. "
            f"See `sparse-distill label-status {job.out}`, fix the cause and re-run the same command."
        )
    return status
