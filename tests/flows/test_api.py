"""The Python entry point of the pipeline: configs from objects, dicts and files with overrides; a whole run."""

from __future__ import annotations

import json

import pytest
import yaml

from sparse_distill.config import ConfigError


def test_configs_from_objects_dicts_and_files(tiny_config, tmp_path):
    from flows.api import load_pipeline_config

    raw = tiny_config.model_dump(mode="json")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    for source in (tiny_config, raw, tmp_path / "c.yaml", str(tmp_path / "c.yaml")):
        cfg = load_pipeline_config(source, {"finetune.lr": 1e-4, "name": "x"})
        assert (cfg.finetune.lr, cfg.name, cfg.student.dim) == (1e-4, "x", 16)
        assert load_pipeline_config(source, ["finetune.lr=5e-4"]).finetune.lr == 5e-4
    assert load_pipeline_config(tiny_config) == tiny_config
    with pytest.raises(ConfigError, match="finetune.lr"):
        load_pipeline_config(tiny_config, {"finetune.lr": "fast"})
    with pytest.raises(ConfigError, match="bogus"):
        load_pipeline_config(raw, {"bogus.key": 1})


@pytest.mark.slow
def test_run_pipeline_returns_the_summary(tiny_config, tmp_path, monkeypatch):
    from flows.api import run_pipeline

    monkeypatch.chdir(tmp_path)
    summary = run_pipeline(tiny_config, run_dir=tmp_path / "run", overrides={"tracking.log_model": False})
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["run_name"] == "tiny" and "mlflow_model_uri" not in summary
