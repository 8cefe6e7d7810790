"""Run a command and sample the peak resident memory of its whole process tree (workers and servers included)."""

from __future__ import annotations

import subprocess
import threading
import time

import psutil


def run_measured(
    cmd: list[str], timeout: float | None = None, kill_above_mb: float | None = None, every: float = 0.1, **kwargs
) -> dict:
    """Run `cmd`; returns its exit code, wall seconds and the peak of the summed RSS of it and its children (MB).

    The tree is killed (rc "killed: memory") when it passes `kill_above_mb`, and on `timeout` (rc "timeout").

    Sampling misses peaks shorter than `every`, so this is a lower bound; `ru_maxrss` cannot sum a tree.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, **kwargs)
    peak = 0
    stop = threading.Event()
    killed = []

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
                if kill_above_mb is not None and total > kill_above_mb * 2**20:
                    for p in reversed(procs):
                        try:
                            p.kill()
                        except psutil.Error:
                            pass
                    killed.append(True)
                    return
            except psutil.Error:
                pass
            stop.wait(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        rc = "timeout"
    stop.set()
    thread.join()
    if killed:
        rc = f"killed: over {kill_above_mb:.0f} MB"
    return {"rc": rc, "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak / 2**20)}
