"""The one registry of experiments (name -> what runs it), the one check of an experiment's name, and running one
experiment over a finished base run. The command line and the Prefect flow both read it."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_distill.config import ConfigError, ExperimentConfig
from sparse_distill.data import atomic_write_text
from sparse_distill.experiments import ablations, augment, baselines, cascade, domain, mlp, privacy, wos
from sparse_distill.experiments.base import BaseRun, Context, VariantMetrics, default_out_dir
from sparse_distill.experiments.tables import markdown_table, plot_results
from sparse_distill.pipeline import load_task_data

logger = logging.getLogger(__name__)

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Experiment:
    """What runs an experiment over a base run: rows for its table (and, `with_info`, a dict of findings)."""

    run: Callable[[Context], Any]
    with_info: bool = False  # `run` returns (rows, info) rather than rows
    split: str | None = None  # the split its table reports, when not the students' eval split


EXPERIMENTS: dict[str, Experiment] = {
    "privacy": Experiment(privacy.run_privacy),
    "domain": Experiment(domain.run_domain),
    "ablations": Experiment(ablations.run_ablations),
    "baselines": Experiment(baselines.run_baselines),
    "wos": Experiment(wos.run_wos, split="dev"),  # WOS probes the teacher on dev texts
    "mlp": Experiment(mlp.run_mlp),
    "augment": Experiment(augment.run_augment),
    "cascade": Experiment(cascade.run_cascade, with_info=True),
}


def experiment_names(spec: str) -> list[str]:
    """`privacy`, `privacy,domain` or `all` as a list of experiment names; ConfigError on an unknown one."""
    names = list(EXPERIMENTS) if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        raise ConfigError(f"experiment: unknown {unknown or spec!r}; choose from {', '.join(EXPERIMENTS)} or all")
    return names


def get_experiment(name: str) -> Experiment:
    """The experiment called `name` (exactly one); ConfigError on an unknown name, a list or `all`."""
    names = experiment_names(name)
    if len(names) != 1:
        raise ConfigError(f"experiment: {name!r} names {len(names)} experiments; give one")
    return EXPERIMENTS[names[0]]


@dataclass
class ExperimentResult:
    """What an experiment produced: its rows, its markdown table and where they are written."""

    name: str
    rows: Rows
    table: str
    out_dir: Path
    info: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)


def run_experiment(
    name: str, config: ExperimentConfig, base: BaseRun, on_metrics: VariantMetrics | None = None
) -> ExperimentResult:
    """Run one experiment over a finished base run; write `<out>/<name>/results.md` and `results.json`."""
    experiment = get_experiment(name)
    out = default_out_dir(config, base.config) / name
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(config, base, load_task_data(base.config.data), out, on_metrics)
    logger.info("experiment %s on %s -> %s", name, base.config.name, out)
    output = experiment.run(ctx)
    rows, info = output if experiment.with_info else (output, {})
    table = markdown_table(name, rows, base.config.name, experiment.split or ctx.eval_name, info)
    result = ExperimentResult(name, rows, table, out, info, plot_results(name, rows, out))
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(
        out / "results.json",
        json.dumps({"experiment": name, "task": base.config.name, "rows": rows, "info": info}, indent=2, default=str),
    )
    return result
