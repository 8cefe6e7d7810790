"""Run the pipeline from Python (a notebook, a script): a config object, dict or YAML file in, the summary out.

```python
from flows.api import run_pipeline

summary = run_pipeline("configs/demo.yaml", overrides={"finetune.lr": 1e-4})
summary["student_model_dir"], summary["mlflow_run_id"]
```

It lives with the flows because it starts one (the library, `sparse_distill`, never imports Prefect).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparse_distill.config import PipelineConfig

Overrides = Mapping[str, Any] | list[str] | None


def load_pipeline_config(
    config: PipelineConfig | Mapping[str, Any] | str | Path, overrides: Overrides = None
) -> PipelineConfig:
    """A validated PipelineConfig from a config object, a dict or a YAML file, with `overrides` applied:
    `{"key.path": value}` (values as given) or `["key.path=value", ...]` (values parsed as YAML, as `--set`)."""
    from pydantic import ValidationError

    from sparse_distill.config import ConfigError, PipelineConfig, apply_overrides, format_validation_error, load_config

    strings = [] if isinstance(overrides, Mapping) else list(overrides or [])
    if isinstance(config, str | Path):
        cfg = load_config(config, strings)
        raw = cfg.model_dump(mode="json")
    else:
        raw = apply_overrides(
            config.model_dump(mode="json") if isinstance(config, PipelineConfig) else dict(config), strings
        )
    for key, value in overrides.items() if isinstance(overrides, Mapping) else []:
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part!r} is not a section")
        node[leaf] = value
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"config: {format_validation_error(e)}") from e


def run_pipeline(
    config: PipelineConfig | Mapping[str, Any] | str | Path,
    run_dir: str | Path | None = None,
    overrides: Overrides = None,
) -> dict[str, Any]:
    """Run the whole pipeline (every finished stage served from cache, as `sparse-distill run`) and return its summary
    (`summary.json`: accuracies, speed, `student_model_dir`, `mlflow_run_id`, `mlflow_model_uri`, ...)."""
    from flows.cli import configure_environment

    # Prefect reads its settings when imported: the project defaults go in first (each one overridable).
    configure_environment()
    cfg = load_pipeline_config(config, overrides)
    from flows.pipeline_flow import pipeline_flow

    return pipeline_flow(config=cfg, run_dir=None if run_dir is None else str(run_dir))
