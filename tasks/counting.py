"""Prefect tasks for corpus-scale n-gram counting: plan, count a shard, sum a partition, select the vocabulary.

Thin wrappers over `sparse_distill.counting`: they take the job (a small config) and small work items, and return
small records; the counts themselves go straight to Parquet on the worker.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sparse_distill import counting
from sparse_distill.config import VocabJob
from sparse_distill.shard_plan import CorpusSource


@task(name="plan-counting", cache_policy=NO_CACHE)
def plan_counting(job: VocabJob, sources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write (or reopen) the plan in the output directory; returns the shards still to count."""
    prep = counting.prepare_count(job, [CorpusSource(**s) for s in sources] if sources else None)
    get_run_logger().info(
        "%s: %d shards, %d to count, %d of %d docs already counted",
        prep["out"],
        prep["shards"],
        len(prep["pending"]),
        prep["rows_done"],
        prep["rows_total"],
    )
    return prep


@task(name="count-shard", cache_policy=NO_CACHE, retry_delay_seconds=2)
def count_shard(job: VocabJob, work: dict[str, Any]) -> dict[str, Any]:
    """Count one pending shard's n-grams into its hash-partitioned spill."""
    record = counting.count_job_shard(job, work)
    get_run_logger().info(
        "shard %05d: %d docs, %d partial counts in %.1f s (%.0f docs/s, pid %d)",
        record["index"],
        record["docs"],
        record["distinct"],
        record["seconds"],
        record["docs"] / max(record["seconds"], 1e-9),
        os.getpid(),
    )
    return record


@task(name="record-failed-count-shard", cache_policy=NO_CACHE)
def record_failed_shard(job: VocabJob, work: dict[str, Any], error: str) -> dict[str, Any]:
    """Keep a shard's final error in its record."""
    get_run_logger().error("shard %05d failed after retries: %s", work["shard"]["index"], error)
    return counting.fail_count_shard(job, work, error)


@task(name="plan-reduce", cache_policy=NO_CACHE)
def plan_reduce(job: VocabJob) -> dict[str, Any]:
    """Check every shard is counted; returns the partitions still to sum."""
    return counting.prepare_reduce(job)


@task(name="sum-partition", cache_policy=NO_CACHE, retry_delay_seconds=2)
def sum_partition(job: VocabJob, work: dict[str, Any], inputs: str) -> dict[str, Any]:
    """Sum one hash partition of the counts over every shard."""
    record = counting.reduce_job_partition(job, work, inputs)
    get_run_logger().info(
        "partition %05d: %d distinct n-grams, %d pass(es), %.1f s",
        record["part"],
        record["rows"],
        record["passes"],
        record["seconds"],
    )
    return {k: v for k, v in record.items() if k != "histogram"}


@task(name="select-vocab", cache_policy=NO_CACHE)
def select_vocab(job: VocabJob, inputs: str | None, docs: int) -> dict[str, Any]:
    """Keep the top |V| n-grams and write OUT/vocab.parquet."""
    result = counting.finish_without_reduce(job) if inputs is None else counting.finish_count(job, inputs, docs)
    get_run_logger().info("vocabulary: kept %d of %d distinct n-grams", result["size"], result["distinct_ngrams"])
    return result
