"""Fanning a stage's work items (shards, partitions) out over the flow's task runner, with progress and failures:
the one loop the labelling and counting flows share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Task, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

Item = dict[str, Any]


class Progress:
    """A Prefect progress artifact and a log line as work is done: `done` of `total` units (docs, partitions)."""

    def __init__(self, description: str, done: int, total: int, verb: str, unit: str) -> None:
        self.done, self.total, self.verb, self.unit = done, total, verb, unit
        self.artifact = create_progress_artifact(self.percent, description=description)

    @property
    def percent(self) -> float:
        return 100.0 * self.done / max(self.total, 1)

    def advance(self, n: int) -> None:
        """Count `n` more units done."""
        self.done += n
        update_progress_artifact(self.artifact, self.percent)
        get_run_logger().info("%s %d/%d %s (%.1f%%)", self.verb, self.done, self.total, self.unit, self.percent)


def fan_out(
    task: Task,
    items: list[Item],
    args: Callable[[Item], tuple],
    progress: Progress,
    weight: Callable[[Item], int] = lambda item: 1,
    on_success: Callable[[Item, Any], None] | None = None,
    on_failure: Callable[[Item, str], Any] | None = None,
) -> list[tuple[Item, str]]:
    """Submit `task(*args(item))` for every item and handle each result as it finishes, in any order.

    A success advances `progress` by `weight(item)`, then calls `on_success(item, result)`. A task that still fails
    after its retries calls `on_failure(item, error)` (e.g. to record the shard's error) and the others go on.
    Returns the failed items with their errors.
    """
    futures = {}
    for item in items:
        fut = task.submit(*args(item))
        futures[fut.task_run_id] = (fut, item)
    failures: list[tuple[Item, str]] = []
    for fut in as_completed([f for f, _ in futures.values()]):
        item = futures[fut.task_run_id][1]
        try:
            result = fut.result()
        except Exception as e:  # noqa: BLE001 - every item gets its chance; the caller reports the failures
            error = f"{type(e).__name__}: {e}"
            if on_failure is not None:
                try:
                    on_failure(item, error)
                except Exception as record_error:  # noqa: BLE001 - e.g. the disk is full: the others still go on
                    get_run_logger().error("could not record the failure of %s: %s", item, record_error)
            failures.append((item, error))
            continue
        progress.advance(weight(item))
        if on_success is not None:
            on_success(item, result)
    return failures
