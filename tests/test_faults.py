"""Fault injection, as an operator meets faults: kill -9 of commands (no orphan server, the lock taken over, exactly
once after a resume), two writers on one folder, a full disk during a shard write, and every malformed input named in
one line with exit code 2."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import main
from sparse_distill.config import LabelJob, StudentConfig
from sparse_distill.data import DataError, LabelMap, read_table, remove_temporaries
from sparse_distill.locks import LOCK_FILE, FolderLocked, folder_lock
from sparse_distill.student import save_student
from sparse_distill.training import student_from_config
from sparse_distill.vocab import build_vocab

REPO = Path(__file__).resolve().parent.parent
TEXTS = ["a great film", "a dull film", "great great"]


@pytest.fixture
def model_dir(tmp_path):
    vocab = build_vocab(TEXTS, 20, 2)
    vocab.save(tmp_path / "vocab")
    model = student_from_config(len(vocab), 2, StudentConfig(dim=4, hidden=4))
    return save_student(model, LabelMap.from_values(["neg", "pos"]), tmp_path / "vocab", tmp_path / "model")


def _corpus(path: Path, n: int = 600) -> Path:
    texts = [f"review {i} was {'good' if i % 2 else 'bad'} and the plot was fine" for i in range(n)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=100)
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --- one text-line reader, one row per input row ---------------------------------------------------------------


LINES = ["one\u0085two", "three\u2028four", "form\x0cfeed", "crlf", "", "   ", "last"]


def test_text_lines_split_on_newline_only_in_every_reader(tmp_path):
    from sparse_distill.corpus import index_rows, read_rows

    path = tmp_path / "in.txt"
    path.write_bytes("\n".join(LINES).replace("crlf", "crlf\r").encode())
    expected = list(LINES)
    assert read_table(str(path)).column("text").to_pylist() == expected
    assert index_rows(str(path), 100).rows == len(LINES)
    with pytest.raises(DataError, match=r"row 4, column 'text': text is empty"):
        read_rows(str(path), 0, len(LINES))  # a corpus rejects the same row predict flags (its documented rule)
    assert read_rows(str(path), 0, 4)[0] == expected[:4]


def test_predict_from_stdin_keeps_every_line_in_order(model_dir, monkeypatch, capsys):
    data = "\n".join(["a great film", "", "  ", "a dull film\r", "x\u0085y", "\t"]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data.encode())))
    assert main(["predict", "--model", str(model_dir)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["row"] for r in rows] == list(range(6))
    assert [r["empty"] for r in rows] == [False, True, True, False, False, True]
    # An empty text is predicted from the biases alone: the same answer as any text without a known n-gram.
    assert rows[1]["prob_neg"] == rows[2]["prob_neg"] == rows[5]["prob_neg"]


def test_predict_applies_one_empty_text_rule_on_every_input(model_dir, tmp_path, capsys):
    texts = ["a great film", "", "   ", None, "a dull film"]
    (tmp_path / "in.txt").write_text("\n".join(t or "" for t in texts) + "\n")
    pq.write_table(pa.table({"text": texts, "key": list("abcde")}), tmp_path / "in.parquet")
    pd.DataFrame({"text": texts}).to_json(tmp_path / "in.jsonl", orient="records", lines=True)
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "in.csv", index=False)
    outputs = {}
    for name in ("in.txt", "in.parquet", "in.jsonl", "in.csv"):
        out = tmp_path / f"{name}.out.jsonl"
        assert main(["predict", "--model", str(model_dir), "--input", str(tmp_path / name), "--output", str(out)]) == 0
        outputs[name] = pd.read_json(out, lines=True)
    for name, frame in outputs.items():
        assert frame["row"].tolist() == [0, 1, 2, 3, 4], name
        assert frame["empty"].tolist() == [False, True, True, True, False], name
        assert frame["label"].tolist() == outputs["in.txt"]["label"].tolist(), name
    out = tmp_path / "ids.csv"
    args = ["--input", str(tmp_path / "in.parquet"), "--id-column", "key", "--output", str(out)]
    assert main(["predict", "--model", str(model_dir), *args]) == 0
    assert list(pd.read_csv(out).columns)[:2] == ["row", "id"] and pd.read_csv(out)["id"].tolist() == list("abcde")


# --- one writer per folder -------------------------------------------------------------------------------------


def _hold_as_another_process(folder: Path, pid: int = 4242) -> int:
    """Lock `folder` through a file descriptor of its own: flock treats it like another process's lock."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": pid, "host": "h1", "started": "2026-01-01T00:00:00Z", "command": "x"}).encode(), 0)
    return fd


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    fd = _hold_as_another_process(tmp_path / "out")
    with pytest.raises(FolderLocked, match=r"in use by pid 4242 on host h1 since 2026-01-01T00:00:00Z \(x\)"):
        with folder_lock(tmp_path / "out"):
            pass
    with pytest.raises(FolderLocked, match="inside .*out, which is in use by pid 4242"):
        with folder_lock(tmp_path / "out" / "labels" / "corpus"):  # a lock covers the folders below it
            pass
    os.close(fd)  # the holder dies: the kernel drops its lock, its record stays in the file
    with folder_lock(tmp_path / "out"):
        held = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid()
        with folder_lock(tmp_path / "out" / "labels"):  # re-entrant within the holder
            pass
    assert "taking over the lock of pid 4242" in caplog.text
    assert (tmp_path / "out" / LOCK_FILE).read_text() == ""  # released: names nobody


def test_wait_starts_when_the_holder_finishes(tmp_path):
    fd = _hold_as_another_process(tmp_path / "out")
    got = threading.Event()

    def second() -> None:
        with folder_lock(tmp_path / "out", wait=True, poll_s=0.05):
            got.set()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.3)
    assert not got.is_set()
    os.close(fd)
    t.join(5)
    assert got.is_set()


def test_commands_refuse_a_busy_output_folder_at_once(tiny_teacher, make_tiny_pipeline, tiny_data, tmp_path, capsys):
    corpus = _corpus(tmp_path / "c.parquet", 50)
    fd = _hold_as_another_process(tmp_path / "labels")
    start = time.perf_counter()
    args = ["label", "--teacher", str(tiny_teacher), "--corpus", str(corpus), "--out", str(tmp_path / "labels")]
    assert main(args) == 3
    assert "in use by pid 4242" in _error(capsys)
    assert main(["vocab", "--input", str(corpus), "--out", str(tmp_path / "labels")]) == 3
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(make_tiny_pipeline(tiny_data, tiny_teacher, "sqlite:///x.db")))
    assert main(["run", str(cfg), "--run-dir", str(tmp_path / "labels")]) == 3
    assert time.perf_counter() - start < 30  # refused before Prefect starts
    os.close(fd)


def test_a_sweep_removes_only_temporaries_whose_writer_is_gone(tmp_path):
    from sparse_distill.data import HOST, owner_tag

    live = tmp_path / f".00000.parquet.{owner_tag()}abc.tmp"
    dead = tmp_path / f".00001.parquet.~999999999@{HOST}~abc.tmp"
    legacy = tmp_path / ".00002.parquet.abc.tmp"
    for p in (live, dead, legacy):
        p.write_bytes(b"partial")
    assert remove_temporaries(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == [live.name]


# --- every failure named, in one line, exit code 2 ---------------------------------------------------------------


def test_malformed_inputs_are_named_in_one_line(model_dir, tiny_teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MLflow sets it when an earlier test picks a store
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    assert main(["label", "--teacher", str(tiny_teacher), "--corpus", str(empty), "--out", "o1"]) == 2
    assert f"{empty}: not a readable Parquet file" in _error(capsys)
    assert main(["vocab", "--input", str(empty), "--out", "o2"]) == 2
    assert f"{empty}: not a readable Parquet file" in _error(capsys)

    bad = tmp_path / "bad_model"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "student.safetensors").write_bytes((model_dir / "student.safetensors").read_bytes()[:100])
    (tmp_path / "t.txt").write_text("a great film\n")
    assert main(["predict", "--model", str(bad), "--input", "t.txt"]) == 2
    assert "student.safetensors: not a readable safetensors file" in _error(capsys)

    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    assert main(["run", "binary.yaml"]) == 2
    assert "binary.yaml: not a UTF-8 text file" in _error(capsys)

    assert main(["predict", "--model", "models:/nope@champion", "--input", "t.txt"]) == 2
    assert "models:/nope@champion: no MLflow tracking store" in _error(capsys)
    assert not (tmp_path / "mlflow.db").exists()  # asking never creates a store

    no_column = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"body": ["x"]}), no_column)
    assert main(["label", "--teacher", str(tiny_teacher), "--corpus", str(no_column), "--out", "o3"]) == 2
    assert f"{no_column}: column 'text' not found" in _error(capsys)


def test_a_missing_registered_model_in_a_store_is_named(tmp_path, monkeypatch, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    MlflowClient(uri).search_experiments()  # creates the store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "t.txt").write_text("a great film\n")
    try:
        assert main(["predict", "--model", "models:/nope@champion", "--input", "t.txt"]) == 2
    finally:
        mlflow.set_tracking_uri(None)
    err = _error(capsys)
    errors = [line for line in err.splitlines() if line.startswith("sparse-distill:")]
    assert len(errors) == 1 and "models:/nope@champion: cannot load this model from" in errors[0]
    assert "name=nope not found" in errors[0]


def test_a_read_only_output_folder_is_named(tiny_teacher, tmp_path, monkeypatch, capsys):
    from sparse_distill import locks

    corpus = _corpus(tmp_path / "c.parquet", 20)
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(LOCK_FILE):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(locks.os, "open", read_only)
    args = ["label", "--teacher", str(tiny_teacher), "--corpus", str(corpus), "--out", str(tmp_path / "ro")]
    assert main(args) == 2
    assert f"{tmp_path / 'ro'}" in _error(capsys)


def _pipeline_config(tmp_path: Path, make_tiny_pipeline, tiny_data, tiny_teacher, **data) -> Path:
    raw = make_tiny_pipeline(tiny_data, tiny_teacher, f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw["data"].update(data)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_pipeline_inputs_are_checked_before_start_up_naming_the_config_key(
    make_tiny_pipeline, tiny_data, tiny_teacher, tmp_path, capsys
):
    start = time.perf_counter()
    cfg = _pipeline_config(tmp_path, make_tiny_pipeline, tiny_data, tiny_teacher, train="missing.parquet")
    assert main(["run", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    assert f"data.train: {tiny_data / 'missing.parquet'}: no such file" in _error(capsys)

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "corpus.parquet")
    cfg = _pipeline_config(
        tmp_path, make_tiny_pipeline, tiny_data, tiny_teacher, corpus=[str(tmp_path / "corpus.parquet")]
    )
    assert main(["run", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    assert "data.corpus[0]: " in (err := _error(capsys)) and "column 'text' not found" in err

    dev = pq.read_table(tiny_data / "dev.parquet").to_pandas()
    dev.loc[3, "label"] = "neutral"
    dev.to_parquet(tmp_path / "dev.parquet")
    cfg = _pipeline_config(tmp_path, make_tiny_pipeline, tiny_data, tiny_teacher, dev=str(tmp_path / "dev.parquet"))
    assert main(["run", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    assert "data.dev: " in (err := _error(capsys)) and "row 3, column 'label': label 'neutral' never occurs" in err
    assert time.perf_counter() - start < 30  # no Prefect start-up, no stage
    assert not (tmp_path / "run").exists()


# --- a full disk during a shard write ----------------------------------------------------------------------------


def _full_disk_on(monkeypatch, shard_name: str) -> None:
    from sparse_distill import labelling

    real = labelling.write_soft_labels

    def write(path, ids, logits):
        if Path(path).name == shard_name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, ids, logits)

    monkeypatch.setattr(labelling, "write_soft_labels", write)


def test_a_full_disk_during_a_shard_write_is_recorded_against_the_shard(tiny_teacher, tmp_path, monkeypatch):
    from sparse_distill.labelling import label_job_shard, label_status, prepare_job, run_label_job

    _full_disk_on(monkeypatch, "00001.parquet")
    job = LabelJob(
        teacher=str(tiny_teacher),
        corpus=[str(_corpus(tmp_path / "c.parquet", 300))],
        out=str(tmp_path / "o"),
        max_length=32,
        label={"shard_size": 100},
    )
    prep = prepare_job(job)
    with pytest.raises(OSError):  # the worker records it before the error goes on (to a retry or the flow)
        label_job_shard(job, prep["work"][1], prep["teacher_fingerprint"])
    status = label_status(job.out)
    assert (status["failed"], status["failed_shards"][0]["shard"]) == (1, "00001.parquet")
    assert "No space left on device" in status["failed_shards"][0]["error"]
    status = run_label_job(job)
    assert (status["done"], status["failed"], status["pending"]) == (2, 1, 0)


@pytest.mark.slow
def test_a_full_disk_in_the_labelling_flow_fails_it_cleanly_and_label_status_tells(
    tiny_teacher, tmp_path, monkeypatch, prefect_harness
):
    from flows.label_flow import LabellingFailed, label_corpus_flow
    from sparse_distill.labelling import label_status
    from tasks import labelling as tasks

    _full_disk_on(monkeypatch, "00001.parquet")

    def disk_full(*args, **kwargs):  # even recording the failure afterwards fails: the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tasks, "record_failed_shard", disk_full)
    job = LabelJob(
        teacher=str(tiny_teacher),
        corpus=[str(_corpus(tmp_path / "c.parquet", 300))],
        out=str(tmp_path / "o"),
        max_length=32,
        label={"shard_size": 100, "retries": 0},
        tracking=None,
    )
    with pytest.raises(LabellingFailed, match="00001"):
        label_corpus_flow(job=job)
    status = label_status(job.out)
    assert (status["done"], status["failed"], status["pending"]) == (2, 1, 0)
    assert "No space left on device" in status["failed_shards"][0]["error"]


# --- safe model files -------------------------------------------------------------------------------------------


def test_model_files_are_readable_by_other_users(model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparse_distill.teacher import _save_checkpoint
    from sparse_distill.testing import make_tiny_teacher

    umask = os.umask(0o022)
    os.umask(umask)
    want = 0o666 & ~umask
    assert {f.name: f.stat().st_mode & 0o777 for f in model_dir.iterdir()} == {
        f.name: want for f in model_dir.iterdir()
    }
    raw = make_tiny_teacher(tmp_path / "raw", TEXTS * 5)
    model, tok = AutoModelForSequenceClassification.from_pretrained(raw), AutoTokenizer.from_pretrained(raw)
    _save_checkpoint(model, tok, tmp_path / "teacher", LabelMap.from_values([0, 1]), {"step": 1})
    assert (tmp_path / "teacher" / "model.safetensors").stat().st_mode & 0o777 == want


def test_a_logged_student_loads_without_unpickling(model_dir, tmp_path, monkeypatch):
    import mlflow
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from sparse_distill.mlflow_model import ensure_experiment, log_student_model

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment("faults", uri, tmp_path / "artifacts")
    run_id = MlflowClient(uri).create_run(exp).info.run_id
    try:
        model_uri = log_student_model(model_dir, run_id, tracking_uri=uri)
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "dl")))
        mlmodel = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        assert "model_code_path" in mlmodel and "python_model" not in mlmodel
        assert not list(local.rglob("*.pkl"))
        out = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"text": TEXTS}))
        assert len(out) == 3
    finally:
        mlflow.set_tracking_uri(None)


# --- kill -9 of whole commands: no orphan server, the lock taken over, exactly once --------------------------------


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _children(pid: int) -> dict[int, str]:
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return out


def _server_of(proc: subprocess.Popen, timeout: float = 150.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        servers = [p for p, cmd in _children(proc.pid).items() if "uvicorn" in cmd and "create_app" in cmd]
        if servers:
            return servers[0]
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.2)
    raise AssertionError("no temporary Prefect server started")


def _gone(pid: int, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True  # a zombie holds no port and no memory
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.2)
    return False


def _kill_9_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> int:
    """kill -9 `proc` once `ready()`; returns its temporary server's pid, checked to be gone afterwards."""
    server = _server_of(proc)
    end = time.monotonic() + timeout
    while not ready() and time.monotonic() < end:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert _gone(server), f"the temporary Prefect server {server} outlived kill -9 of its command"
    return server


@pytest.mark.slow
def test_kill_9_of_label_leaves_no_server_refuses_a_second_writer_and_resumes_exactly_once(tiny_teacher, tmp_path):
    corpus = _corpus(tmp_path / "c.parquet", 3000)
    out = tmp_path / "labels"
    args = [
        "label",
        "--teacher",
        str(tiny_teacher),
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--shard-size",
        "100",
        "--no-tracking",
    ]
    first = _cli(args, tmp_path)

    def some_shards_done() -> bool:
        return len(list((out / "shards").glob("*.json"))) >= 3

    _server_of(first)
    second = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert second.returncode == 3 and f"in use by pid {first.pid}" in second.stderr
    _kill_9_when(first, some_shards_done)
    resumed = _cli(args, tmp_path)
    assert resumed.wait(300) == 0, resumed.stdout.read().decode()[-3000:]
    shards = sorted((out / "shards").glob("*.parquet"))
    ids = [i for f in shards for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
    assert sorted(ids) == sorted(f"c.parquet:{i}" for i in range(3000))  # every document once
    assert not list((out / "shards").glob(".*"))


@pytest.mark.slow
def test_kill_9_of_vocab_leaves_no_server_and_resumes_to_the_clean_vocabulary(tmp_path):
    corpus = _corpus(tmp_path / "c.parquet", 4000)
    base = ["vocab", "--input", str(corpus), "--size", "200", "--ngram-max", "3", "--shard-size", "200"]
    clean = _cli([*base, "--out", str(tmp_path / "clean")], tmp_path)
    assert clean.wait(300) == 0, clean.stdout.read().decode()[-3000:]
    out = tmp_path / "killed"
    first = _cli([*base, "--out", str(out)], tmp_path)
    _kill_9_when(first, lambda: len(list((out / "spills").glob("*.json"))) >= 2)
    resumed = _cli([*base, "--out", str(out)], tmp_path)
    assert resumed.wait(300) == 0, resumed.stdout.read().decode()[-3000:]
    assert (out / "vocab.parquet").read_bytes() == (tmp_path / "clean" / "vocab.parquet").read_bytes()


@pytest.mark.slow
def test_kill_9_of_a_pipeline_run_leaves_no_server_and_frees_its_run_directory(
    make_tiny_pipeline, tiny_data, tiny_teacher, tmp_path
):
    cfg = _pipeline_config(tmp_path, make_tiny_pipeline, tiny_data, tiny_teacher)
    run_dir = tmp_path / "run"
    first = _cli(["run", str(cfg), "--run-dir", str(run_dir)], tmp_path)
    _kill_9_when(first, lambda: (run_dir / "config.yaml").exists())
    with folder_lock(run_dir):  # the dead run's lock is free
        pass


# --- teacher fine-tuning resumes after a kill ---------------------------------------------------------------------


class _Killed(Exception):
    pass


def test_teacher_fine_tuning_resumes_from_its_last_state_as_if_never_stopped(tiny_teacher, tiny_data, tmp_path, caplog):
    from safetensors.torch import load_file

    from sparse_distill.config import TeacherConfig
    from sparse_distill.data import load_split
    from sparse_distill.teacher import RESUME_DIR, finetune_teacher

    train, dev = (load_split(str(tiny_data / f"{s}.parquet")) for s in ("train", "dev"))
    lm = LabelMap.from_values(train.labels)
    cfg = TeacherConfig(
        model=str(tiny_teacher), max_length=32, batch_size=32, lr=3e-3, epochs=2, eval_every=5, checkpoint_every=4
    )

    def run(out: Path, kill_at: int | None = None):
        def on_metrics(step: int, metrics: dict) -> None:
            if step == kill_at:
                raise _Killed  # as a kill after step 10: the last state saved is step 8's

        return finetune_teacher(
            cfg, train.texts, lm.encode(train.labels), dev.texts, lm.encode(dev.labels), lm, out, on_metrics
        )

    clean = run(tmp_path / "clean")
    with pytest.raises(_Killed):
        run(tmp_path / "killed", kill_at=10)
    assert (tmp_path / "killed" / RESUME_DIR / "state.pt").exists()
    resumed = run(tmp_path / "killed")
    assert "resuming teacher fine-tuning at step 8 of 20" in caplog.text
    assert (resumed.best_step, resumed.steps, resumed.dev_accuracy) == (
        clean.best_step,
        clean.steps,
        clean.dev_accuracy,
    )
    a = load_file(str(Path(clean.model_dir) / "model.safetensors"))
    b = load_file(str(Path(resumed.model_dir) / "model.safetensors"))
    assert all(bool((a[k] == b[k]).all()) for k in a)
    assert not (tmp_path / "killed" / RESUME_DIR).exists()


def test_debug_shows_the_traceback_before_or_after_the_command(model_dir, tmp_path):
    (tmp_path / "t.txt").write_text("a great film\n")
    for argv in (["--debug", "predict"], ["predict", "--debug"]):
        with pytest.raises(DataError, match="no such file"):
            main([*argv, "--model", str(model_dir), "--input", str(tmp_path / "missing.txt")])


def test_a_hub_teacher_id_passes_preflight_only_online(monkeypatch):
    from sparse_distill.data import DataError
    from sparse_distill.preflight import check_teacher

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    check_teacher("roberta-large")  # legacy hub ids have no organisation
    check_teacher("FacebookAI/roberta-large")
    with pytest.raises(DataError, match="teacher.model: ./no/such/teacher: no such folder"):
        check_teacher("./no/such/teacher")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="teacher.model: roberta-large: no such folder"):
        check_teacher("roberta-large")
