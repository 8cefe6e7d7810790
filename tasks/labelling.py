"""Prefect tasks for corpus labelling: plan, label one shard, record a failure, collect.

Thin wrappers over `sparse_distill.labelling`: they take the job (a small config) and shard numbers, and return
small records; the soft labels themselves go straight to Parquet on the worker.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sparse_distill import labelling
from sparse_distill.config import LabelJob


@task(name="plan-labelling", cache_policy=NO_CACHE)
def plan_labelling(job: LabelJob) -> dict[str, Any]:
    """Write (or reopen) the plan in the output directory; returns the shards still to label."""
    prep = labelling.prepare_job(job)
    get_run_logger().info(
        "%s: %d shards, %d to label, %d of %d docs already done",
        prep["out"],
        prep["shards"],
        len(prep["pending"]),
        prep["rows_done"],
        prep["rows_total"],
    )
    return prep


# Against a Prefect server, a tag concurrency limit on LABELLING_TAG (`make deploy` creates it) caps the shards that
# label at once across all flow runs, so concurrent runs do not oversubscribe the GPUs or cores.
LABELLING_TAG = "sparse-distill-labelling"


@task(name="label-shard", cache_policy=NO_CACHE, retry_delay_seconds=2, tags=[LABELLING_TAG])
def label_shard(
    job: LabelJob, work: dict[str, Any], teacher_fp: str, torch_threads: int | None = None
) -> dict[str, Any]:
    """Label one pending shard (`work`: its spec and source) on whichever worker runs this."""
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    record = labelling.label_job_shard(job, work, teacher_fp)
    get_run_logger().info(
        "shard %05d: %d docs in %.1f s (%.0f docs/s, pid %d)",
        record["index"],
        record["rows"],
        record["seconds"],
        record["rows"] / max(record["seconds"], 1e-9),
        os.getpid(),
    )
    return record


@task(name="record-failed-shard", cache_policy=NO_CACHE)
def record_failed_shard(job: LabelJob, work: dict[str, Any], error: str) -> dict[str, Any]:
    """Keep a shard's final error in its record, for `label-status`."""
    get_run_logger().error("shard %05d failed after retries: %s", work["shard"]["index"], error)
    return labelling.fail_job_shard(job, work, error)


@task(name="collect-labels", cache_policy=NO_CACHE)
def collect_labels(job: LabelJob) -> dict[str, Any]:
    """Fold the shards' records into manifest.json; returns the status."""
    return labelling.finish_job(job)
