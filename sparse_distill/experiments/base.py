"""What every experiment shares: the base run it builds on, its context, the cache of its variants (through the
run store), the DAN trainer and the scoring of students and the teacher."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparse_distill import run_store
from sparse_distill.code_version import code_fingerprint
from sparse_distill.config import (
    ExperimentConfig,
    PipelineConfig,
    StudentConfig,
    TrainConfig,
    fingerprint,
    load_config,
)
from sparse_distill.data import DataError
from sparse_distill.evaluation import measure_throughput, repeat_to
from sparse_distill.inference import StudentPredictor
from sparse_distill.pipeline import TaskData, split_config, stage_fingerprints
from sparse_distill.run_store import label_dir_fingerprint
from sparse_distill.soft_labels import iter_soft_labels
from sparse_distill.student import DanStudent
from sparse_distill.teacher import TeacherPredictor
from sparse_distill.training import BatchSource, InMemoryBatches, SoftLabelStream

# The one trainer, under a name of its own here: tests patch it to check that finished variants are read back.
from sparse_distill.training import train_dan as train_dan_into

logger = logging.getLogger(__name__)

# (variant, step, metrics): training curves, for MLflow.
VariantMetrics = Callable[[str, int, dict[str, float]], None]

# --- the base run --------------------------------------------------------------------------------------------------


@dataclass
class BaseRun:
    """What a finished pipeline run holds that the experiments build on (paths only)."""

    config: PipelineConfig
    run_dir: Path
    teacher_dir: str
    label_dirs: dict[str, str]
    vocab_dir: str
    students: dict[str, str] = field(default_factory=dict)

    @property
    def student_dir(self) -> str:
        """The student the pipeline ships: KD+FT, else KD."""
        for key in ("kdft", "kd"):
            if key in self.students:
                return self.students[key]
        raise DataError(f"{self.run_dir}: no distilled student in this run; run the pipeline first")

    @classmethod
    def from_run_dir(cls, config: PipelineConfig, run_dir: str | Path) -> BaseRun:
        """Read the stages' `result.json`; each must have been made for this config (same fingerprint)."""
        run_dir = Path(run_dir)
        config = split_config(config, run_dir)  # the corpus the stages read, where the run split it into sentences
        fps = stage_fingerprints(config)

        def stage(name: str, required: bool = True) -> dict | None:
            result = run_store.read_stage(run_dir, name)
            if not run_store.is_current(result, fps[name]):
                if required:
                    state = "missing" if result is None else "made for another config"
                    raise DataError(
                        f"{run_store.stage_dir(run_dir, name)}: stage {name!r} is {state}; run "
                        f"`sparse-distill run {config.name}` (or the experiment flow, which runs it) first"
                    )
                return None
            return result

        teacher, vocab = stage("teacher"), stage("vocab")
        labels = {w: r["label_dir"] for w in ("train", "corpus") if (r := stage(f"label_{w}", required=False))}
        if not labels:
            raise DataError(f"{run_dir}: no soft labels (labels/train or labels/corpus) for this config")
        students = {
            k: r["model_dir"]
            for k, s in (("kd", "distill"), ("kdft", "kdft"), ("scratch", "scratch"))
            if (r := stage(s, required=False))
        }
        return cls(config, run_dir, teacher["model_dir"], labels, vocab["vocab_dir"], students)


def load_base_config(config: ExperimentConfig) -> PipelineConfig:
    """The experiment's base pipeline config, with its overrides and data dir."""
    overrides = list(config.pipeline_overrides)
    if config.data_dir:
        overrides.append(f"data.data_dir={config.data_dir}")
    return load_config(config.pipeline, overrides)


def default_out_dir(config: ExperimentConfig, base: PipelineConfig) -> Path:
    """Where an experiment file's results go: its `out_dir`, else runs/experiments/<task>."""
    return Path(config.out_dir or Path("runs") / "experiments" / base.name)


# --- shared pieces -------------------------------------------------------------------------------------------------


@dataclass
class Context:
    """Everything a variant needs: the base run, its data, where to write, how to report curves."""

    config: ExperimentConfig
    base: BaseRun
    data: TaskData
    out_dir: Path
    on_metrics: VariantMetrics | None = None
    _teacher: TeacherPredictor | None = None

    @property
    def train_cfg(self) -> TrainConfig:
        return self.config.train or self.base.config.distill

    @property
    def eval_split(self):
        """Students are scored on test (dev when the task has no test split)."""
        return self.data.test if self.data.test is not None else self.data.dev

    @property
    def eval_name(self) -> str:
        return "test" if self.data.test is not None else "dev"

    def eval_labels(self) -> np.ndarray:
        return np.asarray(self.data.encoded(self.eval_split))

    def teacher(self, model_dir: str | None = None, max_length: int | None = None) -> TeacherPredictor:
        if model_dir is not None:
            return TeacherPredictor(model_dir, max_length=max_length or self.base.config.teacher.max_length)
        if self._teacher is None:
            self._teacher = TeacherPredictor(self.base.teacher_dir, max_length=self.base.config.teacher.max_length)
        return self._teacher

    def teacher_sample(self) -> tuple[list[str], np.ndarray]:
        """The seeded sample of eval texts the teacher is scored on (all of them when few enough)."""
        split, labels = self.eval_split, self.eval_labels()
        idx = sample(len(split.texts), self.config.teacher_eval_docs, 13)
        return [split.texts[i] for i in idx], labels[idx]

    def metrics_for(self, variant: str) -> Callable[[int, dict[str, float]], None] | None:
        if self.on_metrics is None:
            return None
        return lambda step, metrics: self.on_metrics(variant, step, metrics)


def sample(n: int, size: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of `size` of `n` items (all of them when `size` is None or too big)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def cached(folder: Path, fp: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A variant's result: read back when the run store calls its folder fresh for this fingerprint, else computed
    (with the seconds it took) and recorded there under the folder's name."""

    def timed() -> dict[str, Any]:
        started = time.perf_counter()
        return {**run(), "seconds": round(time.perf_counter() - started, 1)}

    return run_store.cached(folder, folder.name, fp, timed)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose most probable class is the label (NaN when there are none)."""
    return float((probs.argmax(1) == labels).mean()) if len(labels) else float("nan")


def docs_per_s(predict: Callable[[list[str]], np.ndarray], texts: list[str], n: int, batch_size: int = 32) -> float:
    # One thread: every model here is timed the same way, and the 2-thread figures live in the inference benchmark.
    return measure_throughput(predict, repeat_to(texts, n), batch_size, threads=1)


def score_student(ctx: Context, model_dir: str | Path, max_order: int | None = None, speed: bool = True) -> dict:
    """Accuracy on the eval split, docs/s from raw text and parameter counts of a saved DAN."""
    predictor = StudentPredictor.load(model_dir, max_order=max_order)
    split = ctx.eval_split
    row = {
        "accuracy": accuracy(predictor.predict_proba(split.texts), ctx.eval_labels()),
        "params": predictor.model.param_counts()["total"],
    }
    if speed:
        row["docs_per_s"] = docs_per_s(predictor.predict_proba, split.texts, ctx.config.speed_docs)
    return row


def soft_labels_in_memory(label_dirs: list[str]) -> tuple[list[str], np.ndarray]:
    """All (text, teacher probabilities) of some labelling outputs, in memory (train sets and small corpora)."""
    texts: list[str] = []
    probs: list[np.ndarray] = []
    for d in label_dirs:
        for t, p in iter_soft_labels(d):
            texts.extend(t)
            probs.append(p)
    return texts, (np.concatenate(probs).astype(np.float32) if probs else np.zeros((0, 0), np.float32))


def train_dan(
    ctx: Context,
    name: str,
    source: Callable[[], BatchSource],
    source_fp: Any,
    vocab_dir: str,
    student: StudentConfig | None = None,
    train: TrainConfig | None = None,
    init: Callable[[DanStudent], None] | None = None,
    init_fp: Any = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one DAN variant (KL to the batches' targets), keep the best dev checkpoint, score it on the eval split.

    The training is the pipeline's (`training.train_dan`); a variant already recorded for its fingerprint is read back.
    """
    student = student or ctx.base.config.student
    train = train or ctx.train_cfg
    folder = ctx.out_dir / name
    fp = fingerprint("dan", name, source_fp, vocab_dir, student, train, init_fp, code_fingerprint("training"))

    def run() -> dict[str, Any]:
        res = train_dan_into(
            folder,
            vocab_dir,
            source(),
            ctx.data.dev.texts,
            ctx.data.encoded(ctx.data.dev),
            ctx.data.label_map,
            student,
            train,
            init=init,
            on_metrics=ctx.metrics_for(name),
            resume_key=fp,
        )
        return {
            "variant": name,
            "model_dir": res["model_dir"],
            "dev_accuracy": res["dev_accuracy"],
            "steps": res["steps"],
            **score_student(ctx, res["model_dir"]),
            **(extra or {}),
        }

    return cached(folder, fp, run)


def label_source(ctx: Context, which: list[str]) -> tuple[Callable[[], BatchSource], Any]:
    """The base run's soft labels (`which`: train, corpus) as a batch source, and their fingerprint."""
    dirs = [ctx.base.label_dirs[w] for w in which]
    train = ctx.train_cfg
    return (lambda: SoftLabelStream(dirs, train.shuffle_buffer, train.seed)), [label_dir_fingerprint(d) for d in dirs]


def gold_source(ctx: Context) -> tuple[Callable[[], BatchSource], Any]:
    """The train set's gold labels (one-hot) as a batch source, and their fingerprint."""
    d = ctx.data
    return (
        lambda: InMemoryBatches.from_labels(d.train.texts, d.encoded(d.train), d.label_map.num_classes),
        {"gold": d.train.source, "n": len(d.train.texts)},
    )


def model_row(model: str, r: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A table row: the model's title, its scores from the result `r`, and any extra columns."""
    keys = ("accuracy", "dev_accuracy", "params", "docs_per_s")
    return {"model": model, **{k: r[k] for k in keys if k in r}, **extra}


def teacher_row(
    ctx: Context, name: str = "Teacher", model_dir: str | None = None, max_length: int | None = None
) -> dict[str, Any]:
    """The teacher's accuracy on the sampled eval texts, and its docs/s at batch 32 (cached)."""
    teacher_dir = model_dir or ctx.base.teacher_dir
    # One folder per task, shared by its experiments: the teacher is scored once, not once per experiment.
    folder = ctx.out_dir.parent / "teachers" / name.lower().replace(" ", "-").replace("(", "").replace(")", "")
    texts, labels = ctx.teacher_sample()
    fp = fingerprint(
        "teacher",
        teacher_dir,
        max_length,
        ctx.config.teacher_eval_docs,
        ctx.config.teacher_speed_docs,
        ctx.eval_split.source,
    )

    def run() -> dict[str, Any]:
        teacher = ctx.teacher(model_dir, max_length)
        probs = teacher.predict_proba(texts)
        return {
            "accuracy": accuracy(probs, labels),
            "eval_docs": len(texts),
            "params": sum(p.numel() for p in teacher.model.parameters()),
            "docs_per_s": docs_per_s(lambda b: teacher.predict_proba(b, 32), texts, ctx.config.teacher_speed_docs),
        }

    return model_row(name, cached(folder, fp, run), note=f"{len(texts)} {ctx.eval_name} docs")
