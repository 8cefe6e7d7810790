"""The experiments as Prefect flows: make sure the base pipeline run exists (cached stages), then run one experiment
over it, log it to MLflow and publish its table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.pipeline_flow import _flow_run_id, base_stages_flow, resolve_run_dir
from sparse_distill.config import ExperimentConfig, load_config
from sparse_distill.experiments import get_experiment, load_base_config
from tasks import experiments as t


@flow(name="sparse-distill-experiment")
def experiment_flow(name: str, config: ExperimentConfig) -> dict[str, Any]:
    """One experiment (privacy, domain, ablations, baselines, wos, mlp, augment or cascade) over the base run."""
    get_experiment(name)  # an unknown name fails here, before the base stages run
    pipeline = load_base_config(config)
    run_dir = resolve_run_dir(pipeline, config.run_dir)
    # The stages the experiments build on; each is served from its cache when the run already has it.
    base_stages_flow(config=pipeline, run_dir=run_dir)
    if name == "domain" and config.domain.source_pipeline:
        d = config.domain
        source = load_config(d.source_pipeline, [f"data.data_dir={d.source_data_dir}"] if d.source_data_dir else [])
        base_stages_flow.with_options(name="source-base-stages")(
            config=source, run_dir=resolve_run_dir(source, d.source_run_dir)
        )
    tracking = t.start_experiment_tracking(name, config, pipeline, _flow_run_id())
    result = t.run_experiment(name, config, pipeline, run_dir, tracking)
    published = t.publish_experiment(result, config, tracking)
    get_run_logger().info("results: %s", Path(result["out_dir"]) / "results.md")
    return published
