"""The console script: predict from text, tabular input; clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_distill.cli import main
from sparse_distill.config import StudentConfig
from sparse_distill.data import LabelMap
from sparse_distill.inference import StudentPredictor
from sparse_distill.student import save_student
from sparse_distill.training import student_from_config
from sparse_distill.vocab import build_vocab

TEXTS = ["a great film", "a dull film", "great great"]


@pytest.fixture
def model_dir(tmp_path):
    vocab = build_vocab(TEXTS, 20, 2)
    vocab.save(tmp_path / "vocab")
    model = student_from_config(len(vocab), 2, StudentConfig(dim=4, hidden=4))
    return save_student(model, LabelMap.from_values(["neg", "pos"]), tmp_path / "vocab", tmp_path / "model")


def _predict(model_dir, *args) -> int:
    return main(["predict", "--model", str(model_dir), *map(str, args)])


def test_predict_text_file_to_jsonl(model_dir, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    assert _predict(model_dir, "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.jsonl")) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = StudentPredictor.load(model_dir).predict_proba(TEXTS)
    assert [r["label"] for r in rows] == ["neg" if p[0] > p[1] else "pos" for p in expected]
    assert abs(rows[0]["prob_pos"] - expected[0][1]) < 1e-6


def test_predict_parquet_with_text_column_to_csv(model_dir, tmp_path):
    pq.write_table(pa.table({"review": TEXTS}), tmp_path / "in.parquet")
    assert (
        _predict(
            model_dir,
            "--input",
            str(tmp_path / "in.parquet"),
            "--text-column",
            "review",
            "--output",
            str(tmp_path / "out.csv"),
        )
        == 0
    )
    assert list(pd.read_csv(tmp_path / "out.csv").columns) == ["label", "prob_neg", "prob_pos"]


def test_predict_errors_name_the_problem(model_dir, tmp_path, capsys):
    pq.write_table(pa.table({"review": TEXTS}), tmp_path / "in.parquet")
    assert _predict(model_dir, "--input", tmp_path / "in.parquet") == 2
    assert "column 'text' not found" in capsys.readouterr().err


def test_run_with_bad_config_exits_2(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("data: {train: a, dev: b}\nteacher: {model: x}\nbogus: 1\n")
    assert main(["run", str(tmp_path / "c.yaml")]) == 2
    assert "bogus" in capsys.readouterr().err


def test_label_commands_explain_bad_arguments(tmp_path, capsys):
    assert main(["label", "--corpus", "x.parquet"]) == 2
    assert "all of --teacher, --corpus and --out" in capsys.readouterr().err
    assert main(["label", "--teacher", str(tmp_path), "--corpus", "x", "--out", "o", "--shard-size", "0"]) == 2
    assert "label.shard_size" in capsys.readouterr().err
    assert main(["label-status", str(tmp_path / "nowhere")]) == 2
    assert "no labelling manifest" in capsys.readouterr().err


def test_label_status_text_and_json(tiny_teacher, tmp_path, capsys):
    from sparse_distill.config import LabelJob
    from sparse_distill.labelling import run_label_job

    (tmp_path / "c.txt").write_text("a great film\n\na dull film\nfine\n")
    out = tmp_path / "labels"
    run_label_job(
        LabelJob(teacher=str(tiny_teacher), corpus=[str(tmp_path / "c.txt")], out=str(out), label={"shard_size": 2})
    )
    assert main(["label-status", str(out)]) == 1  # a failed shard: non-zero, for scripts
    text = capsys.readouterr().out
    assert "2 shards: 1 done, 1 failed, 0 pending" in text and "FAILED 00000.parquet" in text and "row 1" in text
    assert main(["label-status", str(out), "--json"]) == 1
    status = json.loads(capsys.readouterr().out)
    assert status["rows_written"] == 2 and status["failed_shards"][0]["rows"] == "0-2"


def test_quantize_reports_sizes_and_accuracy_change(model_dir, tmp_path, capsys):
    labels = ["pos" if i % 2 else "neg" for i in range(len(TEXTS))]
    pq.write_table(pa.table({"text": TEXTS, "label": labels}), tmp_path / "eval.parquet")
    out = tmp_path / "int8"
    argv = ["quantize", "--model", str(model_dir), "--dtype", "int8", "--out", str(out)]
    assert main([*argv, "--eval", str(tmp_path / "eval.parquet")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["accuracy"]) == {"float32", "int8"}
    assert report["accuracy_change"] == round(report["accuracy"]["int8"] - report["accuracy"]["float32"], 4)
    assert report["weights_mb"]["int8"] <= report["weights_mb"]["float32"]
    assert _predict(out, "--input", str(tmp_path / "eval.parquet"), "--threads", "2", "--batch-size", "2") == 0
    assert len(capsys.readouterr().out.splitlines()) == len(TEXTS)
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "nolabel.parquet")
    assert main([*argv, "--eval", str(tmp_path / "nolabel.parquet")]) == 2
    assert "column 'label' not found" in capsys.readouterr().err
