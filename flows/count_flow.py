"""Corpus-scale n-gram counting as a Prefect flow: count shards, sum partitions (both fanned out), select |V|."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from sparse_distill.config import VocabJob
from sparse_distill.counting import CountingFailed
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
    logger = get_run_logger()
    done, total = prep["docs_done"], prep["docs_total"]
    artifact = create_progress_artifact(100.0 * done / max(total, 1), description=f"Counting n-grams into {job.out}")
    shard_task = t.count_shard.with_options(retries=job.vocab.retries)
    futures = {}
    for work in prep["work"]:
        fut = shard_task.submit(job, work)
        futures[fut.task_run_id] = (fut, work)
    failed = 0
    for fut in as_completed([f for f, _ in futures.values()]):
        work = futures[fut.task_run_id][1]
        try:
            record = fut.result()
        except Exception as e:  # noqa: BLE001 - recorded; plan_reduce then fails naming every failed shard
            t.record_failed_shard(job, work, f"{type(e).__name__}: {e}")
            failed += 1
            continue
        done += record["docs"]
        update_progress_artifact(artifact, 100.0 * done / max(total, 1))
        logger.info("counted %d/%d docs (%.1f%%)", done, total, 100.0 * done / max(total, 1))
    if failed:
        logger.error("%d shards failed; the others are counted", failed)


def _sum_partitions(job: VocabJob, red: dict[str, Any]) -> None:
    logger = get_run_logger()
    n = red["partitions"]
    done = n - len(red["pending"])
    artifact = create_progress_artifact(100.0 * done / n, description=f"Summing partitions of {job.out}")
    part_task = t.sum_partition.with_options(retries=job.vocab.retries)
    futures = [part_task.submit(job, work, red["inputs"]) for work in red["work"]]
    errors = []
    for fut in as_completed(futures):
        try:
            fut.result()
        except Exception as e:  # noqa: BLE001 - every partition gets its chance; the error names them all
            errors.append(f"{type(e).__name__}: {e}")
            continue
        done += 1
        update_progress_artifact(artifact, 100.0 * done / n)
        logger.info("summed %d/%d partitions", done, n)
    if errors:
        raise CountingFailed(
            f"{len(errors)} of {n} partitions failed ({errors[0]}); the others are summed. Re-run the same command."
        )
