"""Start, check and stop a Prefect server, an MLflow tracking server and a Prefect worker, all on 127.0.0.1.

    python deployments/servers.py start [--prefect-port 4200] [--mlflow-port 5000] [--backend-store-uri URI]
    python deployments/servers.py worker [--pool sparse-distill]
    python deployments/servers.py status | stop | env

State lives in a project-local folder (`.servers/` unless `--state-dir` or SPARSE_DISTILL_SERVERS is set): one
`NAME.pid` and `logs/NAME.log` per process, and `env.sh`, the settings that point clients at these servers
(`source .servers/env.sh`). Each process starts in its own session, so `stop` ends it with its children.

Databases: Prefect keeps its own in `.servers/prefect.db` (`--prefect-db` takes any URI Prefect accepts, such as
`postgresql+asyncpg://user:pw@host/db`); MLflow uses the project's `mlflow.db`, so runs made without the servers stay
visible (`--backend-store-uri` takes any SQLAlchemy URI, such as `postgresql://user:pw@host/db`). MLflow serves the
artifacts itself (`mlflow-artifacts:/`, stored under `mlartifacts/`), so clients need no shared disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "sparse_distill",
}


def state_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("SPARSE_DISTILL_SERVERS") or ROOT / ".servers").resolve()


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (the venv's prefect / mlflow)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid(state: Path, name: str) -> int | None:
    path = state / f"{name}.pid"
    if not path.exists():
        return None
    try:
        pid = int(path.read_text().split()[0])
    except (ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def _spawn(state: Path, name: str, cmd: list[str], env: dict[str, str]) -> int:
    """Start `cmd` in its own session, output to logs/NAME.log; its pid goes to NAME.pid."""
    if (pid := _pid(state, name)) is not None:
        print(f"{name}: already running (pid {pid})")
        return pid
    (state / "logs").mkdir(parents=True, exist_ok=True)
    log = open(state / "logs" / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it open)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    tmp = state / f".{name}.pid.tmp"
    tmp.write_text(f"{proc.pid}\n{json.dumps(cmd)}\n")
    tmp.replace(state / f"{name}.pid")
    print(f"{name}: started (pid {proc.pid}), log {state / 'logs' / f'{name}.log'}")
    return proc.pid


def _wait_healthy(name: str, url: str, pid: int, state: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            tail = (state / "logs" / f"{name}.log").read_text(errors="replace")[-2000:]
            raise SystemExit(f"{name}: exited during start-up; end of its log:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    print(f"{name}: healthy at {url}")
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"{name}: not healthy after {timeout:.0f} s ({url}); see {state / 'logs' / f'{name}.log'}")


def _client_env(prefect_port: int, mlflow_port: int) -> dict[str, str]:
    return {
        "PREFECT_API_URL": f"http://{HOST}:{prefect_port}/api",
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{mlflow_port}",
    }


def start(a: argparse.Namespace) -> None:
    state = state_dir(a.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **QUIET}
    prefect_env = {
        **env,
        "PREFECT_HOME": str(state / "prefect-home"),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": a.prefect_db or f"sqlite+aiosqlite:///{state / 'prefect.db'}",
    }
    prefect_env.pop("PREFECT_API_URL", None)  # the server itself must not point at another API
    prefect_pid = _spawn(
        state,
        "prefect",
        [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(a.prefect_port), "--no-services"]
        if a.no_services
        else [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(a.prefect_port)],
        prefect_env,
    )
    backend = a.backend_store_uri or f"sqlite:///{ROOT / 'mlflow.db'}"
    artifacts = Path(a.artifacts or ROOT / "mlartifacts").resolve()
    mlflow_pid = _spawn(
        state,
        "mlflow",
        [
            _bin("mlflow"),
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(artifacts),
            "--host",
            HOST,
            "--port",
            str(a.mlflow_port),
            "--workers",
            "1",
        ],
        env,
    )
    client = _client_env(a.prefect_port, a.mlflow_port)
    (state / "env.sh").write_text("".join(f"export {k}={v}\n" for k, v in client.items()))
    _wait_healthy("prefect", f"http://{HOST}:{a.prefect_port}/api/health", prefect_pid, state, a.timeout)
    _wait_healthy("mlflow", f"http://{HOST}:{a.mlflow_port}/health", mlflow_pid, state, a.timeout)
    print(
        f"clients: source {state / 'env.sh'}  (Prefect UI http://{HOST}:{a.prefect_port}, "
        f"MLflow UI {client['MLFLOW_TRACKING_URI']})"
    )


def _read_env(state: Path) -> dict[str, str]:
    path = state / "env.sh"
    if not path.exists():
        raise SystemExit(f"{path}: no servers started here; run `make server` first")
    pairs = (line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return dict(pairs)


def worker(a: argparse.Namespace) -> None:
    state = state_dir(a.state_dir)
    # PWD: the deployments' pull step runs each flow in "{{ $PWD }}", this checkout.
    env = {**os.environ, **QUIET, **_read_env(state), "PREFECT_HOME": str(state / "prefect-home"), "PWD": str(ROOT)}
    # Creating the pool is idempotent here: an existing pool of that name is kept as it is.
    subprocess.run(
        [_bin("prefect"), "work-pool", "create", a.pool, "--type", "process"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cmd = [_bin("prefect"), "worker", "start", "--pool", a.pool, "--type", "process"]
    if a.limit:
        cmd += ["--limit", str(a.limit)]
    _spawn(state, f"worker-{a.pool}", cmd, env)


def stop(a: argparse.Namespace) -> None:
    state = state_dir(a.state_dir)
    names = sorted(p.stem for p in state.glob("*.pid")) if state.exists() else []
    # Workers first, so that no flow run is started while the servers go away.
    for name in sorted(names, key=lambda n: not n.startswith("worker")):
        pid = _pid(state, name)
        if pid is not None:
            _stop_group(name, pid, a.timeout)
        (state / f"{name}.pid").unlink(missing_ok=True)
    if not names:
        print("nothing to stop")


def _stop_group(name: str, pid: int, timeout: float) -> None:
    # SIGINT first: a Prefect worker that is backing off ignores SIGTERM (see notes/stack.md).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if not _alive(pid):
            break
    print(f"{name}: stopped (pid {pid})")


def status(a: argparse.Namespace) -> None:
    state = state_dir(a.state_dir)
    rows = {p.stem: _pid(state, p.stem) for p in sorted(state.glob("*.pid"))} if state.exists() else {}
    print(json.dumps({"state_dir": str(state), "running": rows, "env": _read_env(state) if rows else {}}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", help="Where pids, logs and env.sh go (default .servers/ in the repository).")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="Start the Prefect and MLflow servers and wait until both answer.")
    s.add_argument("--prefect-port", type=int, default=int(os.environ.get("PREFECT_PORT", 4200)))
    s.add_argument("--mlflow-port", type=int, default=int(os.environ.get("MLFLOW_PORT", 5000)))
    s.add_argument("--prefect-db", default=os.environ.get("PREFECT_DB"), help="Prefect database URI.")
    s.add_argument(
        "--backend-store-uri", default=os.environ.get("MLFLOW_BACKEND_STORE_URI"), help="MLflow database URI."
    )
    s.add_argument("--artifacts", default=os.environ.get("MLFLOW_ARTIFACTS"), help="Where MLflow stores artifacts.")
    s.add_argument("--no-services", action="store_true", help="Prefect API only (no scheduler): for tests.")
    s.add_argument("--timeout", type=float, default=120.0, help="Seconds to wait for each server to answer.")
    w = sub.add_parser("worker", help="Create the process work pool if missing and start a worker on it.")
    w.add_argument("--pool", default=os.environ.get("POOL", "sparse-distill"))
    w.add_argument("--limit", type=int, help="Flow runs this worker runs at once.")
    t = sub.add_parser("stop", help="Stop the workers, then the servers.")
    t.add_argument("--timeout", type=float, default=20.0, help="Seconds per signal before the next, stronger one.")
    sub.add_parser("status", help="What runs, with its pid, and the client settings.")
    sub.add_parser("env", help='Print the client settings (eval "$(python deployments/servers.py env)").')
    a = p.parse_args()
    if a.command == "env":
        print("".join(f"export {k}={v}\n" for k, v in _read_env(state_dir(a.state_dir)).items()), end="")
        return
    {"start": start, "worker": worker, "stop": stop, "status": status}[a.command](a)


if __name__ == "__main__":
    main()
