"""The paper's ablations: pooling, n-gram order at inference, |V| x d at fixed budgets, depth, and a table
initialised from the teacher's vectors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from sparse_distill.data import atomic_write
from sparse_distill.experiments.base import Context, label_source, model_row, score_student, train_dan
from sparse_distill.run_store import file_fingerprint
from sparse_distill.student import init_table_from_vectors
from sparse_distill.teacher import TeacherPredictor
from sparse_distill.vocab import NgramVocab

logger = logging.getLogger(__name__)


def run_ablations(ctx: Context) -> list[dict[str, Any]]:
    """Pooling, n-gram order at inference, |V| x d at fixed budgets, depth, and a table initialised from the teacher."""
    acfg, base = ctx.config.ablations, ctx.base
    which = [w for w in ("corpus", "train") if w in base.label_dirs]
    src, src_fp = label_source(ctx, which)
    # The grid varies one DAN's table (|V| x d): members, which split d, stay out of it.
    student = base.config.student.model_copy(update={"members": 1})
    rows: list[dict[str, Any]] = []
    variants: dict[str, dict[str, Any]] = {}

    def dan(name: str, **kwargs: Any) -> dict[str, Any]:
        if name not in variants:
            variants[name] = train_dan(ctx, name, src, src_fp, **kwargs)
        return variants[name]

    full = NgramVocab.load(base.vocab_dir)
    known = len(full.ngrams)  # |V|: the n-gram rows, not the subword buckets after them
    for pooling in acfg.poolings:
        r = dan(f"pool-{pooling}", vocab_dir=base.vocab_dir, student=student.model_copy(update={"pooling": pooling}))
        rows.append(model_row(f"pooling = {pooling}", r, ablation="pooling", V=known, d=student.dim))
    if acfg.orders:
        ref = dan("pool-mean", vocab_dir=base.vocab_dir, student=student.model_copy(update={"pooling": "mean"}))
        for order in acfg.orders:
            r = score_student(ctx, ref["model_dir"], max_order=order)
            rows.append(model_row(f"n <= {order} at inference", r, ablation="n-gram order", V=known, d=student.dim))
    for budget in acfg.budgets:
        for dim in acfg.dims:
            size = budget // dim
            if size > known:
                logger.info("grid: |V| = %d for d = %d exceeds the vocabulary (%d); skipped", size, dim, known)
                continue
            vocab_dir = _top_vocab(ctx, full, size)
            r = dan(f"grid-{budget}-{dim}", vocab_dir=vocab_dir, student=student.model_copy(update={"dim": dim}))
            rows.append(model_row(f"|V| = {size:,}, d = {dim}", r, ablation=f"budget {budget:,}", V=size, d=dim))
    for layers in acfg.layers:
        name = "pool-mean" if layers == 1 else f"layers-{layers}"
        r = dan(
            name, vocab_dir=base.vocab_dir, student=student.model_copy(update={"pooling": "mean", "layers": layers})
        )
        rows.append(model_row(f"{layers} dense hidden layer(s)", r, ablation="depth", V=known, d=student.dim))
    if acfg.teacher_init_vocab:
        size = min(acfg.teacher_init_vocab, known)
        vocab_dir = _top_vocab(ctx, full, size)
        r = dan(f"init-random-{size}", vocab_dir=vocab_dir)
        rows.append(model_row("random init", r, ablation=f"table init (|V| = {size:,})", V=size, d=student.dim))
        vectors_path = _teacher_vectors(ctx, vocab_dir)
        r = dan(
            f"init-teacher-{size}",
            vocab_dir=vocab_dir,
            init=lambda m: init_table_from_vectors(m, np.load(vectors_path)),
            init_fp=file_fingerprint(str(vectors_path)),
        )
        rows.append(
            model_row("initialised from the teacher", r, ablation=f"table init (|V| = {size:,})", V=size, d=student.dim)
        )
    return rows


def _top_vocab(ctx: Context, full: NgramVocab, size: int) -> str:
    """The full vocabulary cut to its `size` most frequent n-grams, saved once under the output dir."""
    if size >= len(full.ngrams):
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
        atomic_write(path, lambda tmp: np.save(tmp, vectors), suffix=".npy")
    return path
