"""Real servers on loopback: a Prefect server, an MLflow server, a process work pool, the deployments, a worker.

The retraining deployment runs a tiny config to completion; its student becomes the registry's champion. A second
run of a worse config becomes the challenger and leaves the champion where it was. Everything runs under tmp_path
(servers' databases, artifacts, run directories) and is stopped at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny-student"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, body: dict) -> list | dict:
    request = urllib.request.Request(
        f"{base}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture
def servers(tmp_path):
    """Both servers started by deployments/servers.py in a state folder under tmp_path; stopped afterwards."""
    state = tmp_path / "servers"
    script = [sys.executable, str(ROOT / "deployments/servers.py"), "--state-dir", str(state)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PWD": str(ROOT)}
    start = [
        "start",
        "--prefect-port",
        str(_free_port()),
        "--mlflow-port",
        str(_free_port()),
        "--prefect-db",
        f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts",
        str(tmp_path / "mlartifacts"),
    ]
    try:
        subprocess.run([*script, *start], env=env, cwd=ROOT, check=True, timeout=240)
        client_env = dict(
            line.removeprefix("export ").split("=", 1) for line in (state / "env.sh").read_text().splitlines()
        )
        yield script, {**env, **client_env}
    finally:
        subprocess.run([*script, "stop"], env=env, cwd=ROOT, timeout=120)
        pids = [p for p in state.glob("*.pid")] if state.exists() else []
        assert not pids, f"left running: {pids}"


@pytest.mark.slow
def test_scheduled_retraining_registers_a_champion_and_a_worse_run_leaves_it(servers, tiny_config, tmp_path):
    script, env = servers
    cfg = tiny_config.model_dump(mode="json")
    cfg["tracking"] = {"experiment": "retrain", "registered_model": MODEL_NAME, "min_retention": 0.5}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    job = {"teacher": cfg["teacher"]["model"], "corpus": [f"{cfg['data']['data_dir']}/corpus.parquet"]}
    (tmp_path / "label.yaml").write_text(yaml.safe_dump({**job, "out": str(tmp_path / "labels")}))

    # Deploy: prefect.yaml written from the validated configs, the pool and the labelling limit created.
    deploy = [sys.executable, str(ROOT / "deployments/deploy.py"), "--config", str(tmp_path / "tiny.yaml")]
    deploy += ["--label-job", str(tmp_path / "label.yaml"), "--pool", "test-pool", "--out", str(tmp_path / "p.yaml")]
    subprocess.run([*deploy, "--runs-root", str(tmp_path / "runs")], env=env, cwd=ROOT, check=True, timeout=240)
    subprocess.run([*script, "worker", "--pool", "test-pool"], env=env, cwd=ROOT, check=True, timeout=120)
    api = env["PREFECT_API_URL"]
    names = {d["name"] for d in _api(api, "/deployments/filter", {})}
    assert names == {"retrain", "label-corpus", "evaluate"}
    limits = _api(api, "/concurrency_limits/filter", {})
    assert [(c["tag"], c["concurrency_limit"]) for c in limits] == [("sparse-distill-labelling", 1)]

    def runs_named(name: str) -> list:
        return _api(api, "/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})

    def run_retrain(name: str, params: dict | None = None) -> dict:
        cmd = [sys.executable, "-m", "prefect", "deployment", "run", "sparse-distill-retrain/retrain"]
        cmd += ["--flow-run-name", name, "--watch", "--watch-timeout", "600"]
        if params is not None:
            cmd += ["--params", json.dumps(params)]
        done = subprocess.run(cmd, env=env, cwd=ROOT, timeout=660, capture_output=True, text=True)
        runs = runs_named(name)
        assert len(runs) == 1 and runs[0]["state_type"] == "COMPLETED", done.stdout[-3000:] + done.stderr[-3000:]
        return runs[0]

    # The cron schedule queues the next runs; the server's scheduler runs on a loop, so wait for its next pass.
    deadline = time.monotonic() + 180
    while not _api(api, "/flow_runs/filter", {}) and time.monotonic() < deadline:
        time.sleep(2)
    assert _api(api, "/flow_runs/filter", {}), "the cron schedule queued no runs within 180 s"
    # A bad parameter is refused before any run is created.
    bad = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "sparse-distill-retrain/retrain"]
        + ["--flow-run-name", "bad", "--params", json.dumps({"config": {**cfg, "student": {"dim": -1}}})],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0
    assert runs_named("bad") == []

    first = run_retrain("first")
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.version == "1"
    run = client.get_run(champion.run_id)
    assert run.data.tags["prefect.root_flow_run_id"] == first["id"]
    assert run.data.tags["prefect.flow_run_id"]  # the pipeline's own (sub)flow run
    assert run.data.metrics["student_kdft_accuracy"] > 0.5
    assert client.search_logged_models([run.info.experiment_id])
    assert (tmp_path / "runs" / "tiny" / first["id"] / "summary.json").exists()

    # A worse config: one step of training. Its run completes, but the champion stays.
    worse = {**cfg, "distill": {**cfg["distill"], "max_steps": 1}, "finetune": {**cfg["finetune"], "max_steps": 1}}
    worse["student"] = {**cfg["student"], "dim": 2, "init_std": 0.001}
    second = run_retrain("worse", {"config": worse})
    assert second["id"] != first["id"]
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == "1"
    challenger = client.get_model_version_by_alias(MODEL_NAME, "challenger")
    assert challenger.version == "2"
    reason = client.get_run(challenger.run_id).data.tags["sparse_distill.registry.reason"]
    assert "champion" in reason or "retention" in reason


def test_committed_prefect_yaml_matches_the_config_files_and_bad_configs_are_refused(tmp_path):
    deploy = [sys.executable, str(ROOT / "deployments/deploy.py")]
    assert subprocess.run([*deploy, "--check"], cwd=ROOT, timeout=120).returncode == 0
    (tmp_path / "bad.yaml").write_text("teacher: t\ncorpus: [c.parquet]\nout: o\nlabel: {shard_size: 0}\n")
    bad = subprocess.run(
        [*deploy, "--label-job", str(tmp_path / "bad.yaml"), "--write-only", "--out", str(tmp_path / "p.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "bad.yaml: label.shard_size" in bad.stderr
    assert not (tmp_path / "p.yaml").exists()
