"""The task runners a stage's shards run on: threads or processes on this machine, or a Dask cluster."""

from __future__ import annotations

from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from sparse_distill.config import RunnerConfig


def make_task_runner(cfg: RunnerConfig):
    """The task runner named by the config: threads or processes here, or Dask (a LocalCluster or a cluster)."""
    if cfg.runner == "thread":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    if cfg.runner == "process":
        return ProcessPoolTaskRunner(max_workers=cfg.workers)
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": 1, "dashboard_address": None},
    )
