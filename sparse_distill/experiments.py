"""The experiments of the Sparse Distillation paper and of "The unreasonable effectiveness of distillation" blog, as
plain functions over a finished pipeline run (its teacher, soft labels, vocabulary and students).

Each experiment trains or scores a handful of variants and returns rows for one markdown table. Every variant is
written to its own folder under the experiment's output dir with a `result.json` holding its fingerprint (the
experiment's config section, its inputs and the library version), so an interrupted experiment resumes where it
stopped and a finished one is read back instead of re-run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sparse_distill import __version__
from sparse_distill.augment import augment_texts, shuffle_words, word_order_sensitivity
from sparse_distill.config import (
    EXPERIMENTS,
    ExperimentConfig,
    LabelJob,
    PipelineConfig,
    StudentConfig,
    TrainConfig,
    VocabJob,
    fingerprint,
    load_config,
)
from sparse_distill.data import DataError, atomic_write_parquet, atomic_write_text
from sparse_distill.evaluation import measure_throughput, repeat_to
from sparse_distill.inference import StudentPredictor
from sparse_distill.labelling import run_label_job
from sparse_distill.pipeline import (
    STAGE_DIRS,
    TaskData,
    corpus_paths,
    file_fingerprint,
    label_sources,
    load_task_data,
    read_result,
    stage_fingerprints,
)
from sparse_distill.soft_labels import iter_soft_labels, read_manifest
from sparse_distill.student import DanStudent, init_table_from_vectors, load_student
from sparse_distill.teacher import TeacherPredictor
from sparse_distill.training import BatchSource, InMemoryBatches, SoftLabelStream
from sparse_distill.training import train_dan as train_dan_into
from sparse_distill.vocab import NgramVocab

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
        fps = stage_fingerprints(config)

        def stage(name: str, required: bool = True) -> dict | None:
            result = read_result(run_dir / STAGE_DIRS[name])
            if result is None or result.get("fingerprint") != fps[name]:
                if required:
                    state = "missing" if result is None else "made for another config"
                    raise DataError(
                        f"{run_dir / STAGE_DIRS[name]}: stage {name!r} is {state}; run "
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
        idx = _sample(len(split.texts), self.config.teacher_eval_docs, 13)
        return [split.texts[i] for i in idx], labels[idx]

    def metrics_for(self, variant: str) -> Callable[[int, dict[str, float]], None] | None:
        if self.on_metrics is None:
            return None
        return lambda step, metrics: self.on_metrics(variant, step, metrics)


def _sample(n: int, size: int | None, seed: int) -> np.ndarray:
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _cached(folder: Path, fp: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A variant's result: read back when its folder holds one for this fingerprint, else computed and written."""
    path = folder / "result.json"
    if path.exists():
        done = json.loads(path.read_text())
        if done.get("fingerprint") == fp:
            logger.info("%s: done already (fingerprint %s)", folder.name, fp)
            return done
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {**run(), "fingerprint": fp, "seconds": round(time.perf_counter() - started, 1), "version": __version__}
    atomic_write_text(path, json.dumps(result, indent=2, default=str))
    return result


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean()) if len(labels) else float("nan")


def _docs_per_s(predict: Callable[[list[str]], np.ndarray], texts: list[str], n: int, batch_size: int = 32) -> float:
    # One thread: every model here is timed the same way, and the 2-thread figures live in the inference benchmark.
    return measure_throughput(predict, repeat_to(texts, n), batch_size, threads=1)


def score_student(ctx: Context, model_dir: str | Path, max_order: int | None = None, speed: bool = True) -> dict:
    """Accuracy on the eval split, docs/s from raw text and parameter counts of a saved DAN."""
    predictor = StudentPredictor.load(model_dir, max_order=max_order)
    split = ctx.eval_split
    row = {
        "accuracy": _accuracy(predictor.predict_proba(split.texts), ctx.eval_labels()),
        "params": predictor.model.param_counts()["total"],
    }
    if speed:
        row["docs_per_s"] = _docs_per_s(predictor.predict_proba, split.texts, ctx.config.speed_docs)
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
    """Train one DAN variant (KL to the batches' targets), keep the best dev checkpoint, score it on the eval split."""
    student = student or ctx.base.config.student
    train = train or ctx.train_cfg
    folder = ctx.out_dir / name
    fp = fingerprint("dan", name, source_fp, vocab_dir, student, train, init_fp)

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
        )
        return {
            "variant": name,
            "model_dir": res["model_dir"],
            "dev_accuracy": res["dev_accuracy"],
            "steps": res["steps"],
            **score_student(ctx, res["model_dir"]),
            **(extra or {}),
        }

    return _cached(folder, fp, run)


def _label_source(ctx: Context, which: list[str]) -> tuple[Callable[[], BatchSource], Any]:
    dirs = [ctx.base.label_dirs[w] for w in which]
    train = ctx.train_cfg
    return (lambda: SoftLabelStream(dirs, train.shuffle_buffer, train.seed)), [_dir_fp(d) for d in dirs]


def _dir_fp(label_dir: str) -> dict[str, Any]:
    # Which labels these are: the shards' checksums and the teachers that made them.
    m = read_manifest(label_dir)
    shards = sorted({(s.checksum, s.teacher_fingerprint) for s in m.shards}, key=str)
    return {"dir": str(Path(label_dir).resolve()), "rows": m.total_rows, "shards": fingerprint(shards)}


def _gold_source(ctx: Context) -> tuple[Callable[[], BatchSource], Any]:
    d = ctx.data
    return (
        lambda: InMemoryBatches.from_labels(d.train.texts, d.encoded(d.train), d.label_map.num_classes),
        {"gold": d.train.source, "n": len(d.train.texts)},
    )


def _row(model: str, r: dict[str, Any], **extra: Any) -> dict[str, Any]:
    keys = ("accuracy", "dev_accuracy", "params", "docs_per_s")
    return {"model": model, **{k: r[k] for k in keys if k in r}, **extra}


def _teacher_row(ctx: Context, name: str = "Teacher", model_dir: str | None = None, max_length: int | None = None):
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
            "accuracy": _accuracy(probs, labels),
            "eval_docs": len(texts),
            "params": sum(p.numel() for p in teacher.model.parameters()),
            "docs_per_s": _docs_per_s(lambda b: teacher.predict_proba(b, 32), texts, ctx.config.teacher_speed_docs),
        }

    return _row(name, _cached(folder, fp, run), note=f"{len(texts)} {ctx.eval_name} docs")


# --- privacy -------------------------------------------------------------------------------------------------------


def run_privacy(ctx: Context) -> list[dict[str, Any]]:
    """KD on the corpus alone (no train text in labels or vocabulary) against KD on corpus + train."""
    base = ctx.base
    if "corpus" not in base.label_dirs:
        raise DataError(f"{base.run_dir}: the privacy experiment needs an unlabelled corpus (data.corpus is empty)")
    rows = [_teacher_row(ctx)]
    with_train = ["corpus", "train"] if "train" in base.label_dirs else ["corpus"]
    src, src_fp = _label_source(ctx, with_train)
    r = train_dan(ctx, "kd-corpus+train", src, src_fp, base.vocab_dir)
    rows.append(_row("DAN, KD on corpus + train", r, train_text_used="labels and vocabulary"))
    vocab_dir = base.vocab_dir
    if ctx.config.privacy.vocab_from_corpus:
        vocab_dir = _corpus_vocab(ctx)
    src, src_fp = _label_source(ctx, ["corpus"])
    r = train_dan(ctx, "kd-corpus-only", src, src_fp, vocab_dir)
    rows.append(
        _row(
            "DAN, KD on corpus only",
            r,
            train_text_used="none" if ctx.config.privacy.vocab_from_corpus else "vocabulary only",
        )
    )
    if "scratch" in base.students:
        rows.append(_row("DAN from scratch (train labels)", score_student(ctx, base.students["scratch"])))
    return rows


def _corpus_vocab(ctx: Context) -> str:
    """The top-|V| n-grams of the corpus alone (the counting job: resumable, bounded memory)."""
    from sparse_distill.counting import run_count_job

    cfg = ctx.base.config
    out = ctx.out_dir / "vocab-corpus-only"
    job = VocabJob(
        inputs=corpus_paths(cfg.data), out=str(out), text_column=cfg.data.text_column, replan=False, vocab=cfg.vocab
    )
    result = read_result(out)
    fp = fingerprint("corpus-vocab", job, [file_fingerprint(p) for p in job.inputs])
    if result is None or result.get("fingerprint") != fp:
        res = run_count_job(job, sources=label_sources(cfg, "corpus"))
        atomic_write_text(out / "result.json", json.dumps({"fingerprint": fp, "size": res["size"]}))
    return str(out)


# --- domain adaptation ---------------------------------------------------------------------------------------------


def run_domain(ctx: Context) -> list[dict[str, Any]]:
    """Source teacher labels the target corpus; KD; fine-tune on the target train set, with and without fresh dense
    layers; against the student trained on the target alone."""
    dcfg, base = ctx.config.domain, ctx.base
    if not dcfg.source_pipeline:
        raise DataError("domain.source_pipeline is not set: name the source task's pipeline config")
    if not base.config.data.corpus:
        raise DataError(f"{base.config.name}: the domain experiment needs a target corpus (data.corpus is empty)")
    overrides = [f"data.data_dir={dcfg.source_data_dir}"] if dcfg.source_data_dir else []
    source_cfg = load_config(dcfg.source_pipeline, overrides)
    source = BaseRun.from_run_dir(source_cfg, dcfg.source_run_dir or Path("runs") / source_cfg.name)
    max_length = dcfg.label_max_length or source_cfg.teacher.max_length
    rows = [
        _teacher_row(ctx, f"Teacher ({source_cfg.name}, no adaptation)", source.teacher_dir, max_length),
        _teacher_row(ctx, f"Teacher ({base.config.name})"),
    ]
    # The source teacher's soft labels on the target corpus (the labelling job: sharded and resumable).
    label_dir = ctx.out_dir / "domain-labels"
    cfg = base.config
    job = LabelJob(
        teacher=source.teacher_dir,
        corpus=corpus_paths(cfg.data),
        out=str(label_dir),
        text_column=cfg.data.text_column,
        id_column=cfg.data.id_column,
        limit=dcfg.corpus_limit,
        max_length=max_length,
        replan=True,
        label=cfg.label.model_copy(update={"max_length": max_length}),
    )
    status = run_label_job(job)
    if status["failed"]:
        raise DataError(f"{label_dir}: {status['failed']} shards failed to label; see `sparse-distill label-status`")
    train = ctx.train_cfg
    kd = train_dan(
        ctx,
        "domain-kd",
        lambda: SoftLabelStream([str(label_dir)], train.shuffle_buffer, train.seed),
        _dir_fp(str(label_dir)),
        base.vocab_dir,
    )
    rows.append(_row(f"DAN, KD from the {source_cfg.name} teacher (no target labels)", kd))
    gold, gold_fp = _gold_source(ctx)
    for reinit in (False, True):
        name = "domain-kd-ft-reinit" if reinit else "domain-kd-ft"

        def init(model: DanStudent, reinit: bool = reinit) -> None:
            trained, _ = load_student(kd["model_dir"], mmap=False)
            state = trained.state_dict()
            if reinit:
                # Keep the n-gram table only: the dense layers start afresh for the target task.
                state = {k: v for k, v in state.items() if k.startswith("embedding.")}
            model.load_state_dict(state, strict=not reinit)

        r = train_dan(
            ctx,
            name,
            gold,
            gold_fp,
            base.vocab_dir,
            train=dcfg.finetune,
            init=init,
            init_fp=[kd["fingerprint"], reinit],
        )
        rows.append(_row("DAN, KD + FT on target" + (" (dense layers re-initialised)" if reinit else ""), r))
    if "scratch" in base.students:
        rows.append(_row("DAN trained on the target alone", score_student(ctx, base.students["scratch"])))
    else:
        r = train_dan(ctx, "domain-target-only", gold, gold_fp, base.vocab_dir, train=cfg.scratch)
        rows.append(_row("DAN trained on the target alone", r))
    return rows


# --- ablations -----------------------------------------------------------------------------------------------------


def run_ablations(ctx: Context) -> list[dict[str, Any]]:
    """Pooling, n-gram order at inference, |V| x d at fixed budgets, depth, and a table initialised from the teacher."""
    acfg, base = ctx.config.ablations, ctx.base
    which = [w for w in ("corpus", "train") if w in base.label_dirs]
    src, src_fp = _label_source(ctx, which)
    student = base.config.student
    rows: list[dict[str, Any]] = []
    variants: dict[str, dict[str, Any]] = {}

    def dan(name: str, **kwargs: Any) -> dict[str, Any]:
        if name not in variants:
            variants[name] = train_dan(ctx, name, src, src_fp, **kwargs)
        return variants[name]

    full = NgramVocab.load(base.vocab_dir)
    for pooling in acfg.poolings:
        r = dan(f"pool-{pooling}", vocab_dir=base.vocab_dir, student=student.model_copy(update={"pooling": pooling}))
        rows.append(_row(f"pooling = {pooling}", r, ablation="pooling", V=len(full), d=student.dim))
    if acfg.orders:
        ref = dan("pool-mean", vocab_dir=base.vocab_dir, student=student.model_copy(update={"pooling": "mean"}))
        for order in acfg.orders:
            r = score_student(ctx, ref["model_dir"], max_order=order)
            rows.append(_row(f"n <= {order} at inference", r, ablation="n-gram order", V=len(full), d=student.dim))
    for budget in acfg.budgets:
        for dim in acfg.dims:
            size = budget // dim
            if size > len(full):
                logger.info("grid: |V| = %d for d = %d exceeds the vocabulary (%d); skipped", size, dim, len(full))
                continue
            vocab_dir = _top_vocab(ctx, full, size)
            r = dan(f"grid-{budget}-{dim}", vocab_dir=vocab_dir, student=student.model_copy(update={"dim": dim}))
            rows.append(_row(f"|V| = {size:,}, d = {dim}", r, ablation=f"budget {budget:,}", V=size, d=dim))
    for layers in acfg.layers:
        name = "pool-mean" if layers == 1 else f"layers-{layers}"
        r = dan(
            name, vocab_dir=base.vocab_dir, student=student.model_copy(update={"pooling": "mean", "layers": layers})
        )
        rows.append(_row(f"{layers} dense hidden layer(s)", r, ablation="depth", V=len(full), d=student.dim))
    if acfg.teacher_init_vocab:
        size = min(acfg.teacher_init_vocab, len(full))
        vocab_dir = _top_vocab(ctx, full, size)
        r = dan(f"init-random-{size}", vocab_dir=vocab_dir)
        rows.append(_row("random init", r, ablation=f"table init (|V| = {size:,})", V=size, d=student.dim))
        vectors_path = _teacher_vectors(ctx, vocab_dir)
        r = dan(
            f"init-teacher-{size}",
            vocab_dir=vocab_dir,
            init=lambda m: init_table_from_vectors(m, np.load(vectors_path)),
            init_fp=file_fingerprint(str(vectors_path)),
        )
        rows.append(
            _row("initialised from the teacher", r, ablation=f"table init (|V| = {size:,})", V=size, d=student.dim)
        )
    return rows


def _top_vocab(ctx: Context, full: NgramVocab, size: int) -> str:
    """The full vocabulary cut to its `size` most frequent n-grams, saved once under the output dir."""
    if size >= len(full):
        return ctx.base.vocab_dir
    out = ctx.out_dir / "vocabs" / f"top-{size}"
    if not (out / "vocab.parquet").exists() or NgramVocab.load(out).ngrams[-1:] != full.ngrams[size - 1 : size]:
        full.top(size).save(out)
    return str(out)


def _teacher_vectors(ctx: Context, vocab_dir: str) -> Path:
    """Every n-gram's text encoded by the teacher (mean-pooled last layer), saved as .npy."""
    path = Path(vocab_dir) / "teacher_vectors.npy"
    if not path.exists():
        ngrams = NgramVocab.load(vocab_dir).ngrams
        teacher = TeacherPredictor(ctx.base.teacher_dir, max_length=16)
        logger.info("encoding %d n-grams with the teacher", len(ngrams))
        vectors = teacher.encode(ngrams, batch_size=ctx.config.ablations.teacher_init_batch_size, progress_every=10_000)
        tmp = path.with_name(f".{path.name}.tmp.npy")
        np.save(tmp, vectors)
        tmp.rename(path)
    return path


# --- baselines and the small MLP -----------------------------------------------------------------------------------


def _distill_targets(ctx: Context) -> tuple[list[str], np.ndarray, Any]:
    dirs = [ctx.base.label_dirs[w] for w in ("corpus", "train") if w in ctx.base.label_dirs]
    texts, probs = soft_labels_in_memory(dirs)
    return texts, probs, [_dir_fp(d) for d in dirs]


def _one_hot(labels: list[int], num_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), num_classes), np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def _word_student(
    ctx: Context,
    name: str,
    kind: str,
    texts: list[str],
    targets: np.ndarray,
    targets_fp: Any,
    vocab_size: int,
    max_len: int,
    train: TrainConfig,
    model_kwargs: dict[str, Any],
) -> dict[str, Any]:
    from sparse_distill import baselines as bl

    folder = ctx.out_dir / name
    fp = fingerprint("word-student", name, kind, targets_fp, vocab_size, max_len, train, model_kwargs)

    def run() -> dict[str, Any]:
        torch.manual_seed(train.seed)
        vocab = bl.WordVocab.build(texts, vocab_size)
        model = bl.make_word_student(kind, len(vocab), ctx.data.label_map.num_classes, **model_kwargs)
        res, model = bl.train_word_student(
            model,
            vocab,
            texts,
            targets,
            ctx.data.dev.texts,
            ctx.data.encoded(ctx.data.dev),
            train,
            max_len=max_len,
            on_metrics=ctx.metrics_for(name),
        )
        bl.save_word_student(model, vocab, kind, model_kwargs, folder / "model", max_len=max_len)
        predictor = bl.WordStudentPredictor(model.eval(), vocab, max_len)
        split = ctx.eval_split
        return {
            "variant": name,
            "dev_accuracy": res.best_dev_accuracy,
            "steps": res.steps,
            "accuracy": _accuracy(predictor.predict_proba(split.texts), ctx.eval_labels()),
            "params": model.param_counts()["total"],
            "docs_per_s": _docs_per_s(predictor.predict_proba, split.texts, ctx.config.speed_docs),
        }

    return _cached(folder, fp, run)


def run_baselines(ctx: Context) -> list[dict[str, Any]]:
    """The DAN beside TF-IDF + logistic regression and Bi-LSTM / CNN students distilled from the same soft labels."""
    from sparse_distill import baselines as bl

    bcfg = ctx.config.baselines
    rows = [_teacher_row(ctx), _row("DAN (the pipeline's student)", score_student(ctx, ctx.base.student_dir))]
    texts, probs, targets_fp = _distill_targets(ctx)
    d = ctx.data
    if "tfidf" in bcfg.kinds:
        for soft in (False, True):
            name = "tfidf-kd" if soft else "tfidf-gold"
            folder = ctx.out_dir / name
            fp = fingerprint("tfidf", name, bcfg.tfidf_c, targets_fp if soft else d.train.source)

            def run(soft: bool = soft, folder: Path = folder) -> dict[str, Any]:
                model = bl.TfidfLogReg(C=bcfg.tfidf_c)
                if soft:
                    model.fit_soft(texts, probs)
                else:
                    model.fit(d.train.texts, d.encoded(d.train))
                model.save(folder / "model.joblib")
                split = ctx.eval_split
                return {
                    "accuracy": _accuracy(model.predict_proba(split.texts), ctx.eval_labels()),
                    "dev_accuracy": _accuracy(model.predict_proba(d.dev.texts), np.asarray(d.encoded(d.dev))),
                    "params": model.param_count(),
                    "docs_per_s": _docs_per_s(model.predict_proba, split.texts, ctx.config.speed_docs),
                }

            title = "TF-IDF + LR, " + ("KD (soft labels)" if soft else "gold train labels")
            rows.append(_row(title, _cached(folder, fp, run)))
    for kind, title in (("bilstm", "Bi-LSTM"), ("cnn", "CNN")):
        if kind in bcfg.kinds:
            r = _word_student(
                ctx, f"{kind}-kd", kind, texts, probs, targets_fp, bcfg.word_vocab, bcfg.max_len, bcfg.train, {}
            )
            rows.append(_row(f"{title} student, KD", r))
    return rows


def run_mlp(ctx: Context) -> list[dict[str, Any]]:
    """The blog's small MLP over words (|V| ~ 5k, embedding 16, one hidden layer), with and without distillation."""
    mcfg, d = ctx.config.mlp, ctx.data
    kwargs = {"dim": mcfg.dim, "hidden": mcfg.hidden}
    gold = _one_hot(d.encoded(d.train), d.label_map.num_classes)
    rows = [_teacher_row(ctx)]
    r = _word_student(
        ctx, "mlp-gold", "mlp", d.train.texts, gold, d.train.source, mcfg.word_vocab, mcfg.max_len, mcfg.train, kwargs
    )
    rows.append(_row("MLP, gold train labels", r))
    texts, probs, targets_fp = _distill_targets(ctx)
    r = _word_student(ctx, "mlp-kd", "mlp", texts, probs, targets_fp, mcfg.word_vocab, mcfg.max_len, mcfg.train, kwargs)
    rows.append(_row("MLP, KD (teacher's soft labels)", r))
    return rows


# --- augmentation when there is no corpus --------------------------------------------------------------------------


def run_augment(ctx: Context) -> list[dict[str, Any]]:
    """KD on the train set's soft labels alone, then with teacher-labelled EDA or n-gram-sampled train copies."""
    acfg, base = ctx.config.augment, ctx.base
    if "train" not in base.label_dirs:
        raise DataError(f"{base.run_dir}: the augmentation experiment needs the train set's soft labels")
    train_texts, train_probs = soft_labels_in_memory([base.label_dirs["train"]])
    train_fp = _dir_fp(base.label_dirs["train"])
    tc = ctx.train_cfg
    rows = [_teacher_row(ctx)]

    def source(parts: list[tuple[list[str], np.ndarray]]) -> Callable[[], BatchSource]:
        return lambda: InMemoryBatches(
            [t for texts, _ in parts for t in texts], np.concatenate([p for _, p in parts]), tc.seed
        )

    r = train_dan(ctx, "augment-none", source([(train_texts, train_probs)]), train_fp, base.vocab_dir)
    rows.append(_row("DAN, KD on train soft labels only", r, added_docs=0))
    idx = _sample(len(train_texts), acfg.sample, 13)
    sample = [train_texts[i] for i in idx]
    added: dict[str, tuple[list[str], np.ndarray]] = {}
    for method in acfg.methods:
        added[method] = _labelled_augmentations(ctx, sample, method)
        r = train_dan(
            ctx,
            f"augment-{method}",
            source([(train_texts, train_probs), added[method]]),
            [train_fp, acfg.model_dump(), method],
            base.vocab_dir,
        )
        rows.append(_row(f"DAN, KD on train + {method} copies", r, added_docs=len(added[method][0])))
    if len(acfg.methods) > 1:
        parts = [(train_texts, train_probs), *added.values()]
        r = train_dan(ctx, "augment-all", source(parts), [train_fp, acfg.model_dump(), "all"], base.vocab_dir)
        rows.append(_row("DAN, KD on train + all copies", r, added_docs=sum(len(t) for t, _ in added.values())))
    return rows


def _labelled_augmentations(ctx: Context, texts: list[str], method: str) -> tuple[list[str], np.ndarray]:
    """Augmented copies of the texts with the teacher's probabilities, cached as Parquet."""
    acfg = ctx.config.augment
    path = ctx.out_dir / "augmented" / f"{method}.parquet"
    fp = fingerprint("augment", method, acfg, ctx.base.teacher_dir, len(texts))
    if path.exists():
        table = pq.read_table(path)
        if (table.schema.metadata or {}).get(b"fingerprint", b"").decode() == fp:
            probs = np.asarray(table.column("probs").to_pylist(), np.float32)
            return table.column("text").to_pylist(), probs
    augmented = augment_texts(texts, acfg.per_text, method, seed=13, alpha=acfg.alpha)
    logger.info("labelling %d %s copies with the teacher", len(augmented), method)
    probs = ctx.teacher().predict_proba(augmented, ctx.base.config.label.batch_size)
    table = pa.table({"text": augmented, "probs": [list(map(float, p)) for p in probs]})
    atomic_write_parquet(table.replace_schema_metadata({"fingerprint": fp}), path)
    return augmented, probs.astype(np.float32)


# --- word-order sensitivity ----------------------------------------------------------------------------------------


def run_wos(ctx: Context) -> list[dict[str, Any]]:
    """The teacher on dev texts with their words shuffled: WOS = (100 - p) / 50, with p its accuracy (%) on the
    shuffled copies of the texts it got right (Pham et al. 2020), and what that predicts for a bag of n-grams."""
    wcfg = ctx.config.wos
    dev, labels = ctx.data.dev, np.asarray(ctx.data.encoded(ctx.data.dev))
    idx = _sample(len(dev.texts), wcfg.max_docs, 13)
    texts, gold = [dev.texts[i] for i in idx], labels[idx]
    folder = ctx.out_dir / "wos"
    fp = fingerprint("wos", wcfg, ctx.base.teacher_dir, dev.source)

    def run() -> dict[str, Any]:
        teacher = ctx.teacher()
        probs = teacher.predict_proba(texts)
        correct = probs.argmax(1) == gold
        per_seed = []
        for seed in wcfg.seeds:
            shuffled = teacher.predict_proba(shuffle_words(texts, seed)).argmax(1)
            per_seed.append(
                {
                    "seed": seed,
                    "accuracy_shuffled": float((shuffled == gold).mean()),
                    "p": float((shuffled[correct] == gold[correct]).mean()) if correct.any() else float("nan"),
                }
            )
        p = float(np.mean([s["p"] for s in per_seed]))
        return {
            "docs": len(texts),
            "teacher_accuracy": float(correct.mean()),
            "teacher_accuracy_shuffled": float(np.mean([s["accuracy_shuffled"] for s in per_seed])),
            "p": p,
            "wos": word_order_sensitivity(p),
            "per_seed": per_seed,
        }

    r = _cached(folder, fp, run)
    row = {
        "task": ctx.base.config.name,
        "docs": r["docs"],
        "teacher_accuracy": r["teacher_accuracy"],
        "teacher_accuracy_shuffled": r["teacher_accuracy_shuffled"],
        "p": r["p"],
        "wos": r["wos"],
        "prediction": predict_from_wos(r["wos"]),
    }
    row["student_retention"] = None
    summary = ctx.base.run_dir / "summary.json"
    if summary.exists():
        # The prediction, checked against what the pipeline's bag-of-n-grams student actually kept.
        s = json.loads(summary.read_text())
        row["student_retention"] = s.get("retention_test") or s.get("retention")
    return [row]


def predict_from_wos(wos: float) -> str:
    """What a WOS score predicts for a bag-of-n-grams student (a rule of thumb from the blog's examples: SST-2-like
    tasks sit low, CoLA near 1)."""
    if wos < 0.3:
        return "low: a bag of n-grams should keep most of the teacher's accuracy"
    if wos < 0.6:
        return "moderate: expect a visible gap to the teacher"
    return "high: word order matters; a bag of n-grams will fall well short"


# --- the cascade ---------------------------------------------------------------------------------------------------


def run_cascade(ctx: Context) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Accuracy and docs/s of the student/teacher cascade over thresholds of the student's confidence. The threshold
    is chosen on dev (the fastest reaching the target) and reported on the eval split."""
    from sparse_distill.cascade import cascade_curve, pick_threshold

    ccfg = ctx.config.cascade
    folder = ctx.out_dir / "cascade"
    student_dir = ctx.base.student_dir
    fp = fingerprint(
        "cascade-probs",
        student_dir,
        ctx.base.teacher_dir,
        ctx.config.teacher_eval_docs,
        ctx.config.speed_docs,
        ctx.config.teacher_speed_docs,
    )
    probs_path = folder / "probs.npz"

    def run() -> dict[str, Any]:
        # Both models' probabilities on dev and on the eval sample, and their speeds: the curves follow from these.
        student = StudentPredictor.load(student_dir)
        teacher = ctx.teacher()
        dev = ctx.data.dev
        dev_idx = _sample(len(dev.texts), ctx.config.teacher_eval_docs, 13)
        dev_texts = [dev.texts[i] for i in dev_idx]
        eval_texts, eval_gold = ctx.teacher_sample()
        arrays = {"dev_gold": np.asarray(ctx.data.encoded(dev))[dev_idx], "eval_gold": eval_gold}
        for split, texts in (("dev", dev_texts), ("eval", eval_texts)):
            arrays[f"{split}_student"] = student.predict_proba(texts)
            arrays[f"{split}_teacher"] = teacher.predict_proba(texts)
        tmp = folder / ".probs.tmp.npz"
        np.savez(tmp, **arrays)
        tmp.rename(probs_path)
        # Seconds per document of each model at batch 32, one thread (the cascade's cost model).
        return {
            "student_s_per_doc": 1.0 / _docs_per_s(student.predict_proba, eval_texts, ctx.config.speed_docs),
            "teacher_s_per_doc": 1.0
            / _docs_per_s(lambda b: teacher.predict_proba(b, 32), eval_texts, ctx.config.teacher_speed_docs),
            "dev_docs": len(dev_texts),
            "eval_docs": len(eval_texts),
        }

    r = _cached(folder, fp, run)
    z = np.load(probs_path)
    cost = (r["student_s_per_doc"], r["teacher_s_per_doc"])
    dev_curve = cascade_curve(z["dev_student"], z["dev_teacher"], z["dev_gold"], *cost, metric=ccfg.metric)
    eval_curve = cascade_curve(z["eval_student"], z["eval_teacher"], z["eval_gold"], *cost, metric=ccfg.metric)
    teacher_dev = _accuracy(z["dev_teacher"], z["dev_gold"])
    target = ccfg.target_accuracy or ccfg.target_retention * teacher_dev
    chosen = pick_threshold(dev_curve, target)
    rows = [{**point, "chosen": False} for point in _spread(eval_curve, 9)]
    info: dict[str, Any] = {
        "target_accuracy": target,
        "teacher_dev_accuracy": teacher_dev,
        "threshold": None,
        "metric": ccfg.metric,
        "student_dir": student_dir,
        "teacher_dir": ctx.base.teacher_dir,
        "teacher_max_length": ctx.base.config.teacher.max_length,
        **r,
    }
    if chosen is not None:
        # The dev-chosen threshold applied to the eval split.
        (at,) = cascade_curve(
            z["eval_student"],
            z["eval_teacher"],
            z["eval_gold"],
            *cost,
            thresholds=[chosen["threshold"]],
            metric=ccfg.metric,
        )
        rows.append({**at, "chosen": True})
        info.update(threshold=chosen["threshold"], dev_accuracy=chosen["accuracy"], eval_point=at)
    atomic_write_text(folder / "curves.json", json.dumps({"dev": dev_curve, "eval": eval_curve}, default=float))
    return rows, info


def _spread(curve: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """About n points of a curve, evenly spread over the share deferred to the teacher (both ends included)."""
    if len(curve) <= n:
        return list(curve)
    ordered = sorted(curve, key=lambda p: p["deferred"])
    picks = {round(i * (len(ordered) - 1) / (n - 1)) for i in range(n)}
    return [ordered[i] for i in sorted(picks)]


# --- running one experiment ----------------------------------------------------------------------------------------


@dataclass
class ExperimentResult:
    """What an experiment produced: its rows, its markdown table and where they are written."""

    name: str
    rows: list[dict[str, Any]]
    table: str
    out_dir: Path
    info: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)


def run_experiment(
    name: str, config: ExperimentConfig, base: BaseRun, on_metrics: VariantMetrics | None = None
) -> ExperimentResult:
    """Run one experiment over a finished base run; write `<out>/<name>/results.md` and `results.json`."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    out = default_out_dir(config, base.config) / name
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(config, base, load_task_data(base.config.data), out, on_metrics)
    logger.info("experiment %s on %s -> %s", name, base.config.name, out)
    info: dict[str, Any] = {}
    runners: dict[str, Callable[[Context], list[dict[str, Any]]]] = {
        "privacy": run_privacy,
        "domain": run_domain,
        "ablations": run_ablations,
        "baselines": run_baselines,
        "wos": run_wos,
        "mlp": run_mlp,
        "augment": run_augment,
    }
    if name == "cascade":
        rows, info = run_cascade(ctx)
    else:
        rows = runners[name](ctx)
    split = "dev" if name == "wos" else ctx.eval_name  # WOS probes the teacher on dev texts
    table = markdown_table(name, rows, base.config.name, split, info)
    result = ExperimentResult(name, rows, table, out, info)
    result.plots = _plots(result)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(
        out / "results.json",
        json.dumps({"experiment": name, "task": base.config.name, "rows": rows, "info": info}, indent=2, default=str),
    )
    return result


def _plots(result: ExperimentResult) -> list[str]:
    from sparse_distill.plots import plot_accuracy_vs_speed

    points = [
        {"name": r.get("model") or f"T={r['threshold']:.3f}", "accuracy": r["accuracy"], "docs_per_s": r["docs_per_s"]}
        for r in result.rows
        if r.get("docs_per_s") and r.get("accuracy") is not None and ("model" in r or "threshold" in r)
    ]
    if not points:
        return []
    path = plot_accuracy_vs_speed(points, result.out_dir / "accuracy_vs_speed.png", title=f"{result.name}")
    return [str(path)]


# --- tables --------------------------------------------------------------------------------------------------------


def _fmt(value: Any, key: str = "") -> str:
    if key in ("docs_per_s", "speedup_vs_teacher") and isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:,.0f}" if value >= 100 else f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")  # a pipe would end the markdown cell


_COLUMNS = {
    "cascade": [
        ("threshold", "threshold"),
        ("deferred", "sent to teacher"),
        ("accuracy", "accuracy"),
        ("docs_per_s", "docs/s"),
        ("speedup_vs_teacher", "x teacher"),
        ("chosen", "chosen on dev"),
    ],
    "wos": [
        ("task", "task"),
        ("docs", "dev docs"),
        ("teacher_accuracy", "teacher acc"),
        ("teacher_accuracy_shuffled", "teacher acc, shuffled"),
        ("p", "p (kept correct)"),
        ("wos", "WOS"),
        ("prediction", "prediction"),
        ("student_retention", "measured DAN retention"),
    ],
}


def markdown_table(name: str, rows: list[dict[str, Any]], task: str, eval_name: str, info: dict[str, Any]) -> str:
    """The experiment's rows as a markdown table, with a line saying what was measured."""
    cols = _COLUMNS.get(name)
    if cols is None:
        keys = ["ablation", "model", "accuracy", "dev_accuracy", "params", "docs_per_s"]
        extra = [k for r in rows for k in r if k not in keys and k not in ("V", "d")]
        keys += list(dict.fromkeys(extra))
        present = [k for k in keys if any(k in r for r in rows)]
        titles = {"accuracy": f"{eval_name} acc", "dev_accuracy": "dev acc", "docs_per_s": "docs/s (1 thread)"}
        cols = [(k, titles.get(k, k.replace("_", " "))) for k in present]
    lines = [
        f"**{name}** on {task} ({eval_name} split)",
        "",
        "| " + " | ".join(t for _, t in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), k) for k, _ in cols) + " |")
    if name == "cascade":
        if info.get("threshold") is None:
            lines.append(f"\nNo threshold reaches the target accuracy {info['target_accuracy']:.4f} on dev.")
        else:
            lines.append(
                f"\nTarget accuracy {info['target_accuracy']:.4f} (dev): threshold {info['threshold']:.4f} on "
                f"{info['metric']}; student {1 / info['student_s_per_doc']:,.0f} docs/s, teacher "
                f"{1 / info['teacher_s_per_doc']:,.1f} docs/s (batch 32, 1 thread)."
            )
    return "\n".join(lines)
