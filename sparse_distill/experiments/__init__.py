"""The experiments of the Sparse Distillation paper and of "The unreasonable effectiveness of distillation" blog, as
plain functions over a finished pipeline run (its teacher, soft labels, vocabulary and students).

One module per experiment (privacy, domain, ablations, baselines, wos, mlp, augment, cascade); `base` holds what they
share (the base run, the context, the DAN trainer, scoring, the variants' cache), `tables` the markdown tables and
plots, and `catalog` the one name -> experiment registry that the command line and the Prefect flow read.

Each experiment trains or scores a handful of variants and returns rows for one markdown table. Every variant is
written to its own folder under the experiment's output dir and recorded in the run store (`result.json` with its
fingerprint: the experiment's config section, its inputs and the library version), so an interrupted experiment
resumes where it stopped and a finished one is read back instead of re-run.
"""

from sparse_distill.experiments.base import BaseRun, Context, default_out_dir, load_base_config
from sparse_distill.experiments.catalog import (
    EXPERIMENTS,
    Experiment,
    ExperimentResult,
    experiment_names,
    get_experiment,
    run_experiment,
)

__all__ = [
    "EXPERIMENTS",
    "BaseRun",
    "Context",
    "Experiment",
    "ExperimentResult",
    "default_out_dir",
    "experiment_names",
    "get_experiment",
    "load_base_config",
    "run_experiment",
]
