"""Corpus-scale n-gram counting as a Prefect flow: count shards, sum partitions (both fanned out), select |V|."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.fanout import Progress, fan_out
from sparse_distill.config import VocabJob
from sparse_distill.counting import CountingFailed
from sparse_distill.locks import folder_lock
from sparse_distill.shard_plan import work_rows
from tasks import counting as t


@flow(name="count-ngrams")
def count_ngrams_flow(job: VocabJob, sources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Count the n-grams of `job.inputs` (or `sources`) into `job.out` and keep the top |V|, resuming.

    Shards (map) and then hash partitions (reduce) run on this flow's task runner (`flows.runners.make_task_runner`).
    A shard that still fails after its retries is recorded with its error and the others go on; the flow then
    ends Failed before summing, naming the shards. A re-run counts only what is missing.
    """
    logger = get_run_logger()
    start = time.perf_counter()
    with folder_lock(job.out):  # one writer per output folder (re-entrant: the caller may hold it already)
        prep = t.plan_counting(job, sources)
        if prep["summed"]:
            logger.info("%s: every partition is already summed from these inputs; selecting again", job.out)
            result = t.select_vocab(job, None, 0)
        else:
            _count_shards(job, prep)
            red = t.plan_reduce(job)
            _sum_partitions(job, red)
            result = t.select_vocab(job, red["inputs"], red["docs"])
    seconds = time.perf_counter() - start
    create_markdown_artifact(
        "| docs | distinct n-grams | kept | smallest kept count | seconds |\n|---|---|---|---|---|\n"
        f"| {result['docs']:,} | {result['distinct_ngrams']:,} | {result['size']:,} | {result['min_kept_count']} "
        f"| {seconds:.1f} |\n\n`{result['vocab']}`",
        description=f"Vocabulary of {job.out}",
    )
    return {**result, "seconds": round(seconds, 1)}


def _count_shards(job: VocabJob, prep: dict[str, Any]) -> None:
    progress = Progress(f"Counting n-grams into {job.out}", prep["rows_done"], prep["rows_total"], "counted", "docs")
    failures = fan_out(
        t.count_shard.with_options(retries=job.vocab.retries),
        prep["work"],
        lambda work: (job, work),
        progress,
        weight=work_rows,
        # Recorded; plan_reduce then fails naming every failed shard.
        on_failure=lambda work, error: t.record_failed_shard(job, work, error),
    )
    if failures:
        get_run_logger().error("%d shards failed; the others are counted", len(failures))


def _sum_partitions(job: VocabJob, red: dict[str, Any]) -> None:
    n = red["partitions"]
    progress = Progress(f"Summing partitions of {job.out}", n - len(red["pending"]), n, "summed", "partitions")
    part_task = t.sum_partition.with_options(retries=job.vocab.retries)
    failures = fan_out(part_task, red["work"], lambda work: (job, work, red["inputs"]), progress)
    if failures:
        raise CountingFailed(
            f"{len(failures)} of {n} partitions failed ({failures[0][1]}); the others are summed. "
            "Re-run the same command."
        )
