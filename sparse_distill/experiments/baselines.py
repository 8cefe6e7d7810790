"""The DAN beside other students distilled from the same soft labels (Bi-LSTM, CNN) and TF-IDF + logistic
regression; the word-level students are trained here (the small MLP experiment uses them too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparse_distill.code_version import code_fingerprint
from sparse_distill.config import TrainConfig, fingerprint
from sparse_distill.experiments.base import (
    Context,
    accuracy,
    cached,
    docs_per_s,
    model_row,
    score_student,
    soft_labels_in_memory,
    teacher_row,
)
from sparse_distill.run_store import label_dir_fingerprint


def distill_targets(ctx: Context) -> tuple[list[str], np.ndarray, Any]:
    dirs = [ctx.base.label_dirs[w] for w in ("corpus", "train") if w in ctx.base.label_dirs]
    texts, probs = soft_labels_in_memory(dirs)
    return texts, probs, [label_dir_fingerprint(d) for d in dirs]


def one_hot(labels: list[int], num_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), num_classes), np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def word_student(
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
    code = code_fingerprint("baselines")
    fp = fingerprint("word-student", name, kind, targets_fp, vocab_size, max_len, train, model_kwargs, code)

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
            "accuracy": accuracy(predictor.predict_proba(split.texts), ctx.eval_labels()),
            "params": model.param_counts()["total"],
            "docs_per_s": docs_per_s(predictor.predict_proba, split.texts, ctx.config.speed_docs),
        }

    return cached(folder, fp, run)


def run_baselines(ctx: Context) -> list[dict[str, Any]]:
    """The DAN beside TF-IDF + logistic regression and Bi-LSTM / CNN students distilled from the same soft labels."""
    from sparse_distill import baselines as bl

    bcfg = ctx.config.baselines
    rows = [teacher_row(ctx), model_row("DAN (the pipeline's student)", score_student(ctx, ctx.base.student_dir))]
    texts, probs, targets_fp = distill_targets(ctx)
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
                    "accuracy": accuracy(model.predict_proba(split.texts), ctx.eval_labels()),
                    "dev_accuracy": accuracy(model.predict_proba(d.dev.texts), np.asarray(d.encoded(d.dev))),
                    "params": model.param_count(),
                    "docs_per_s": docs_per_s(model.predict_proba, split.texts, ctx.config.speed_docs),
                }

            title = "TF-IDF + LR, " + ("KD (soft labels)" if soft else "gold train labels")
            rows.append(model_row(title, cached(folder, fp, run)))
    for kind, title in (("bilstm", "Bi-LSTM"), ("cnn", "CNN")):
        if kind in bcfg.kinds:
            r = word_student(
                ctx, f"{kind}-kd", kind, texts, probs, targets_fp, bcfg.word_vocab, bcfg.max_len, bcfg.train, {}
            )
            rows.append(model_row(f"{title} student, KD", r))
    return rows
