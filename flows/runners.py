"""The task runners a stage's shards run on: threads or processes on this machine, or a Dask cluster; and Prefect's
temporary server, started so that it dies with the command that started it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

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
    from prefect.settings import get_current_settings

    if os.environ.get("PREFECT_API_URL"):
        return
    url = get_current_settings().api.url
    if url:  # a server from a profile or a test harness: hand it to the workers as well
        os.environ["PREFECT_API_URL"] = url
        return

    server = start_temporary_server()
    os.environ["PREFECT_API_URL"] = server.api_url
    logging.getLogger(__name__).info("local workers report to this process's Prefect server at %s", server.api_url)


# The watchdog of a temporary server: blocks on a pipe whose only writer is the command; when the command ends,
# however it ends (kill -9 included), the read returns and the server is stopped (SIGTERM, then SIGKILL). The
# command line of the pid is checked first, so a pid reused since is never signalled.
_WATCHDOG = r"""
import os, signal, sys, time
pid, fd = int(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    while os.read(fd, 1):
        pass
except OSError:
    pass
def alive():
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"prefect.server.api.server:" + b"create_app" in f.read()  # split: not to match this script
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
    if not alive():
        break
    try:
        os.kill(pid, sig)
    except OSError:
        break
    end = time.monotonic() + wait
    while time.monotonic() < end and alive():
        time.sleep(0.1)
"""


def _watch(server_pid: int) -> None:
    """Start the watchdog that stops `server_pid` when this process ends (its end of the pipe stays open till then)."""
    read_end, write_end = os.pipe()  # not inheritable: only the watchdog gets the read end, nobody else the write end
    subprocess.Popen(
        [sys.executable, "-I", "-c", _WATCHDOG, str(server_pid), str(read_end)],
        pass_fds=(read_end,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # out of the terminal's process group: it must outlive this process
    )
    os.close(read_end)
    _WATCHDOG_PIPES.append(write_end)  # kept open for this process's lifetime


_WATCHDOG_PIPES: list[int] = []


def start_temporary_server():
    """Start Prefect's temporary server (the instance Prefect's own client uses in ephemeral mode) with a watchdog,
    so that it never outlives this process: Prefect stops it at a normal exit, the watchdog after kill -9 or an
    out-of-memory kill. Returns the server; a no-op when it is already running."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if not server.running:
        launch = server._run_uvicorn_command  # the one place Prefect starts the process (again, on a port clash)

        def launch_watched() -> subprocess.Popen:
            process = launch()
            _watch(process.pid)
            return process

        server._run_uvicorn_command = launch_watched  # this instance only
        server.start()
    return server


def ensure_temporary_server() -> None:
    """Before a command's flows start: without a Prefect server configured, start the temporary one now, watched
    (`start_temporary_server`); with a server configured (PREFECT_API_URL, a profile, a test harness), nothing."""
    from prefect.settings import get_current_settings

    if os.environ.get("PREFECT_API_URL") or get_current_settings().api.url:
        return
    start_temporary_server()
