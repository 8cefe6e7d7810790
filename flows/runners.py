"""The task runners a stage's shards run on: threads or processes on this machine, or a Dask cluster."""

from __future__ import annotations

import logging
import os

from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from sparse_distill.config import RunnerConfig


def make_task_runner(cfg: RunnerConfig):
    """The task runner named by the config: threads or processes here, or Dask (a LocalCluster or a cluster)."""
    if cfg.runner == "thread":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    if cfg.runner == "process":
        share_ephemeral_server()
        return ProcessPoolTaskRunner(max_workers=cfg.workers)
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    share_ephemeral_server()
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": 1, "dashboard_address": None},
    )


def share_ephemeral_server() -> None:
    """Without a Prefect server (PREFECT_API_URL unset), start this process's temporary server now and point
    PREFECT_API_URL at it, so local worker processes report to it instead of each starting their own (~27 s and a few
    hundred MB each). With a real server configured, nothing changes."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    if os.environ.get("PREFECT_API_URL"):
        return
    url = get_current_settings().api.url
    if url:  # a server from a profile or a test harness: hand it to the workers as well
        os.environ["PREFECT_API_URL"] = url
        return

    server = SubprocessASGIServer()  # the same instance Prefect's own client uses in ephemeral mode
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    logging.getLogger(__name__).info("local workers report to this process's Prefect server at %s", server.api_url)
