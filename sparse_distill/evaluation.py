"""Accuracy, macro-F1, confusion matrices and end-to-end throughput (raw text in, probabilities out)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

logger = logging.getLogger(__name__)


def classification_metrics(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows: gold, columns: predicted)."""
    labels = list(range(num_classes))
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0)),
        "confusion": confusion_matrix(gold, pred, labels=labels).tolist(),
    }


def measure_throughput(
    predict_proba: Callable[[list[str]], np.ndarray],
    texts: list[str],
    batch_size: int = 32,
    threads: int | None = None,
    warmup_batches: int = 2,
) -> float:
    """Documents per second from raw text (tokenisation included), in batches of `batch_size`."""
    if not texts:
        raise ValueError("no texts to time")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for i in range(min(warmup_batches, len(texts) // batch_size)):
            predict_proba(texts[i * batch_size : (i + 1) * batch_size])
        start = time.perf_counter()
        for i in range(0, len(texts), batch_size):
            predict_proba(texts[i : i + batch_size])
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    return len(texts) / seconds


def repeat_to(texts: list[str], n: int) -> list[str]:
    """The first n texts, cycling when there are fewer: a fixed workload for timing."""
    if not texts:
        return []
    reps = -(-n // len(texts))
    return (texts * reps)[:n]
