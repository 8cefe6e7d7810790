"""Augmentation when there is no corpus: KD on the train set's soft labels alone, then with teacher-labelled EDA
or n-gram-sampled copies of the train texts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from sparse_distill.augment import augment_texts
from sparse_distill.config import fingerprint
from sparse_distill.data import DataError
from sparse_distill.experiments.base import Context, model_row, sample, soft_labels_in_memory, teacher_row, train_dan
from sparse_distill.run_store import label_dir_fingerprint, read_fresh_table, write_table
from sparse_distill.training import BatchSource, InMemoryBatches

logger = logging.getLogger(__name__)


def run_augment(ctx: Context) -> list[dict[str, Any]]:
    """KD on the train set's soft labels alone, then with teacher-labelled EDA or n-gram-sampled train copies."""
    acfg, base = ctx.config.augment, ctx.base
    if "train" not in base.label_dirs:
        raise DataError(f"{base.run_dir}: the augmentation experiment needs the train set's soft labels")
    train_texts, train_probs = soft_labels_in_memory([base.label_dirs["train"]])
    train_fp = label_dir_fingerprint(base.label_dirs["train"])
    tc = ctx.train_cfg
    rows = [teacher_row(ctx)]

    def source(parts: list[tuple[list[str], np.ndarray]]) -> Callable[[], BatchSource]:
        return lambda: InMemoryBatches(
            [t for texts, _ in parts for t in texts], np.concatenate([p for _, p in parts]), tc.seed
        )

    r = train_dan(ctx, "augment-none", source([(train_texts, train_probs)]), train_fp, base.vocab_dir)
    rows.append(model_row("DAN, KD on train soft labels only", r, added_docs=0))
    idx = sample(len(train_texts), acfg.sample, 13)
    picked = [train_texts[i] for i in idx]
    added: dict[str, tuple[list[str], np.ndarray]] = {}
    for method in acfg.methods:
        added[method] = _labelled_augmentations(ctx, picked, method)
        r = train_dan(
            ctx,
            f"augment-{method}",
            source([(train_texts, train_probs), added[method]]),
            [train_fp, acfg.model_dump(), method],
            base.vocab_dir,
        )
        rows.append(model_row(f"DAN, KD on train + {method} copies", r, added_docs=len(added[method][0])))
    if len(acfg.methods) > 1:
        parts = [(train_texts, train_probs), *added.values()]
        r = train_dan(ctx, "augment-all", source(parts), [train_fp, acfg.model_dump(), "all"], base.vocab_dir)
        rows.append(model_row("DAN, KD on train + all copies", r, added_docs=sum(len(t) for t, _ in added.values())))
    return rows


def _labelled_augmentations(ctx: Context, texts: list[str], method: str) -> tuple[list[str], np.ndarray]:
    """Augmented copies of the texts with the teacher's probabilities, cached as Parquet."""
    acfg = ctx.config.augment
    path = ctx.out_dir / "augmented" / f"{method}.parquet"
    fp = fingerprint("augment", method, acfg, ctx.base.teacher_dir, len(texts))
    table = read_fresh_table(path, fp)
    if table is not None:
        return table.column("text").to_pylist(), np.asarray(table.column("probs").to_pylist(), np.float32)
    augmented = augment_texts(texts, acfg.per_text, method, seed=13, alpha=acfg.alpha)
    logger.info("labelling %d %s copies with the teacher", len(augmented), method)
    probs = ctx.teacher().predict_proba(augmented, ctx.base.config.label.batch_size)
    table = pa.table({"text": augmented, "probs": [list(map(float, p)) for p in probs]})
    write_table(table, path, fp)
    return augmented, probs.astype(np.float32)
