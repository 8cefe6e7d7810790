"""End to end: every experiment over one tiny base run, through the CLI and the Prefect flow, logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def experiment_file(tmp_path_factory, tiny_data, tiny_teacher, make_tiny_pipeline) -> Path:
    d = tmp_path_factory.mktemp("experiments")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    (d / "pipeline.yaml").write_text(yaml.safe_dump(make_tiny_pipeline(tiny_data, tiny_teacher, uri, "tiny-exp")))
    fast = {"lr": 1e-2, "batch_size": 64, "epochs": 3, "eval_every": 10, "shuffle_buffer": 200}
    exp = {
        "pipeline": str(d / "pipeline.yaml"),
        "run_dir": str(d / "run"),
        "out_dir": str(d / "out"),
        "train": fast,
        "teacher_eval_docs": 60,
        "speed_docs": 64,
        "teacher_speed_docs": 32,
        "domain": {
            "source_pipeline": str(d / "pipeline.yaml"),
            "source_run_dir": str(d / "run"),
            "corpus_limit": 200,
            "finetune": {"lr": 1e-3, "batch_size": 64, "epochs": 1, "eval_every": 5},
        },
        "ablations": {
            "poolings": ["mean", "max"],
            "orders": [1, 2],
            "budgets": [2000],
            "dims": [8, 16, 1],
            "layers": [1, 2],
            "teacher_init_vocab": 100,
            "teacher_init_batch_size": 64,
        },
        "baselines": {"word_vocab": 200, "max_len": 32, "train": {**fast, "batch_size": 32, "max_steps": 30}},
        "wos": {"max_docs": 50, "seeds": [1, 2]},
        "mlp": {"word_vocab": 100, "max_len": 32, "train": {**fast, "lr": 1e-2}},
        "augment": {"sample": 40, "per_text": 2},
        "cascade": {"target_retention": 0.9},
        "tracking": {"tracking_uri": uri, "experiment": "tiny-experiments"},
    }
    (d / "experiments.yaml").write_text(yaml.safe_dump(exp))
    return d / "experiments.yaml"


def _results(exp_file: Path, name: str) -> dict:
    out = exp_file.parent / "out" / name
    assert (out / "results.md").exists()
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_every_experiment_runs_over_one_base_run_and_logs_to_mlflow(experiment_file, capsys):
    from flows.cli import main

    assert main(["experiment", "all", str(experiment_file)]) == 0
    printed = capsys.readouterr().out
    for name in ("privacy", "domain", "ablations", "baselines", "wos", "mlp", "augment", "cascade"):
        assert f"**{name}** on tiny-exp" in printed

    rows = _results(experiment_file, "privacy")["rows"]
    models = [r["model"] for r in rows]
    assert models[:3] == ["Teacher", "DAN, KD on corpus + train", "DAN, KD on corpus only"]
    assert rows[2]["train_text_used"] == "none"
    # The corpus-only student's vocabulary was counted on the corpus alone.
    corpus_vocab = experiment_file.parent / "out" / "privacy" / "vocab-corpus-only" / "vocab.parquet"
    assert corpus_vocab.exists()
    assert all(0 <= r["accuracy"] <= 1 for r in rows)

    rows = _results(experiment_file, "domain")["rows"]
    assert any("re-initialised" in r["model"] for r in rows) and any("target alone" in r["model"] for r in rows)

    rows = _results(experiment_file, "ablations")["rows"]
    by_ablation: dict[str, list] = {}
    for r in rows:
        by_ablation.setdefault(r["ablation"], []).append(r)
    assert [r["model"] for r in by_ablation["pooling"]] == ["pooling = mean", "pooling = max"]
    assert [r["model"] for r in by_ablation["n-gram order"]] == ["n <= 1 at inference", "n <= 2 at inference"]
    # Budget 2,000: d = 8 and 16 fit the 500-row vocabulary (|V| 250, 125); d = 1 would need 2,000 rows.
    assert [(r["V"], r["d"]) for r in by_ablation["budget 2,000"]] == [(250, 8), (125, 16)]
    assert all(r["params"] >= 2000 for r in by_ablation["budget 2,000"])
    depth = {r["model"]: r["params"] for r in by_ablation["depth"]}
    assert depth["2 dense hidden layer(s)"] == depth["1 dense hidden layer(s)"] + 16 * 16 + 16
    assert len(by_ablation["table init (|V| = 100)"]) == 2

    rows = _results(experiment_file, "baselines")["rows"]
    assert [r["model"] for r in rows][2:] == [
        "TF-IDF + LR, gold train labels",
        "TF-IDF + LR, KD (soft labels)",
        "Bi-LSTM student, KD",
        "CNN student, KD",
    ]
    assert all(r["docs_per_s"] > 0 and r["params"] > 0 for r in rows)

    (wos,) = _results(experiment_file, "wos")["rows"]
    assert 0 <= wos["wos"] <= 2 and wos["docs"] == 50
    assert wos["student_retention"] is None or wos["student_retention"] > 0  # the base run has no summary.json

    assert [r["model"] for r in _results(experiment_file, "mlp")["rows"]][1:] == [
        "MLP, gold train labels",
        "MLP, KD (teacher's soft labels)",
    ]
    rows = _results(experiment_file, "augment")["rows"]
    assert [r["added_docs"] for r in rows[1:]] == [0, 80, 80, 160]

    cascade = _results(experiment_file, "cascade")
    curve = [r for r in cascade["rows"] if not r["chosen"]]
    deferred = [r["deferred"] for r in curve]
    assert deferred[0] == 0.0 and deferred[-1] == 1.0 and deferred == sorted(deferred)

    client = MlflowClient(f"sqlite:///{experiment_file.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny-experiments")
    runs = client.search_runs([exp.experiment_id], "tags.`sparse_distill.experiment` != ''")
    assert sorted(r.data.tags["sparse_distill.experiment"] for r in runs) == sorted(
        ["privacy", "domain", "ablations", "baselines", "wos", "mlp", "augment", "cascade"]
    )
    assert all(r.info.status == "FINISHED" for r in runs)
    ablation_run = next(r for r in runs if r.data.tags["sparse_distill.experiment"] == "ablations")
    assert "results.md" in [a.path for a in client.list_artifacts(ablation_run.info.run_id)]
    assert "pooling _ max/accuracy" in ablation_run.data.metrics  # "=" is not allowed in MLflow keys
    nested = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{ablation_run.info.run_id}'")
    assert {"pool-mean", "pool-max"} <= {r.info.run_name for r in nested}


@pytest.mark.slow
def test_a_rerun_reads_every_variant_back(experiment_file, monkeypatch):
    import sparse_distill.experiments.base as ex
    from flows.experiment_flow import experiment_flow
    from sparse_distill.config import load_experiment_config

    before = (experiment_file.parent / "out" / "ablations" / "results.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr(ex, "train_dan_into", no_training)
    result = experiment_flow(name="ablations", config=load_experiment_config(experiment_file))
    # Same accuracies and sizes; docs/s of the order rows are re-measured (they are scored, not trained).
    after = result["table"]
    assert before.splitlines()[:4] == after.splitlines()[:4]


@pytest.mark.slow
def test_bad_names_and_stale_base_runs_are_clear_errors(experiment_file, capsys):
    from flows.cli import main
    from sparse_distill.config import load_experiment_config
    from sparse_distill.data import DataError
    from sparse_distill.experiments import BaseRun, load_base_config

    assert main(["experiment", "pruning", str(experiment_file)]) == 2
    assert "unknown ['pruning']" in capsys.readouterr().err
    assert main(["experiment", "wos", str(experiment_file), "--set", "wos.seeds=[]"]) == 2
    assert "wos.seeds" in capsys.readouterr().err
    config = load_experiment_config(experiment_file, ["pipeline_overrides=[teacher.lr=0.5]"])
    with pytest.raises(DataError, match="stage 'teacher' is made for another config"):
        BaseRun.from_run_dir(load_base_config(config), config.run_dir)
