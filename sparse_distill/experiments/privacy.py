"""Privacy: distillation without the task's train data, KD on the corpus alone against KD on corpus + train."""

from __future__ import annotations

from typing import Any

from sparse_distill import run_store
from sparse_distill.config import VocabJob, fingerprint
from sparse_distill.data import DataError
from sparse_distill.experiments.base import Context, label_source, model_row, score_student, teacher_row, train_dan
from sparse_distill.pipeline import corpus_paths, label_sources
from sparse_distill.run_store import file_fingerprint


def run_privacy(ctx: Context) -> list[dict[str, Any]]:
    """KD on the corpus alone (no train text in labels or vocabulary) against KD on corpus + train."""
    base = ctx.base
    if "corpus" not in base.label_dirs:
        raise DataError(f"{base.run_dir}: the privacy experiment needs an unlabelled corpus (data.corpus is empty)")
    rows = [teacher_row(ctx)]
    with_train = ["corpus", "train"] if "train" in base.label_dirs else ["corpus"]
    src, src_fp = label_source(ctx, with_train)
    r = train_dan(ctx, "kd-corpus+train", src, src_fp, base.vocab_dir)
    rows.append(model_row("DAN, KD on corpus + train", r, train_text_used="labels and vocabulary"))
    vocab_dir = base.vocab_dir
    if ctx.config.privacy.vocab_from_corpus:
        vocab_dir = _corpus_vocab(ctx)
    src, src_fp = label_source(ctx, ["corpus"])
    r = train_dan(ctx, "kd-corpus-only", src, src_fp, vocab_dir)
    rows.append(
        model_row(
            "DAN, KD on corpus only",
            r,
            train_text_used="none" if ctx.config.privacy.vocab_from_corpus else "vocabulary only",
        )
    )
    if "scratch" in base.students:
        rows.append(model_row("DAN from scratch (train labels)", score_student(ctx, base.students["scratch"])))
    return rows


def _corpus_vocab(ctx: Context) -> str:
    """The top-|V| n-grams of the corpus alone (the counting job: resumable, bounded memory)."""
    from sparse_distill.counting import run_count_job

    cfg = ctx.base.config
    out = ctx.out_dir / "vocab-corpus-only"
    job = VocabJob(
        inputs=corpus_paths(cfg.data), out=str(out), text_column=cfg.data.text_column, replan=False, vocab=cfg.vocab
    )
    fp = fingerprint("corpus-vocab", job, [file_fingerprint(p) for p in job.inputs])

    def count() -> dict[str, Any]:
        return {"size": run_count_job(job, sources=label_sources(cfg, "corpus"))["size"]}

    run_store.cached(out, "corpus-vocab", fp, count)
    return str(out)
