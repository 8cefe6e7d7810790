"""Evaluation: metrics against hand-worked values, throughput timing, the fixed timing workload."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sparse_distill.evaluation import classification_metrics, measure_throughput, repeat_to


def test_classification_metrics_by_hand():
    gold = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(pred, gold, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per-class F1: class 0: p=1, r=2/3 -> 0.8; class 1: p=1/2, r=1/2 -> 0.5; class 2: p=1/2, r=1 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]  # rows gold, columns predicted
    assert isinstance(m["accuracy"], float) and isinstance(m["confusion"][0][0], int)


def test_classification_metrics_keep_classes_never_seen():
    # A class absent from gold and predictions still has its row and column, and counts as F1 0 in the macro mean.
    m = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 1]), 3)
    assert m["accuracy"] == 1.0
    assert m["confusion"] == [[1, 0, 0], [0, 2, 0], [0, 0, 0]]
    assert m["macro_f1"] == pytest.approx(2 / 3)


def test_perfect_and_all_wrong():
    gold = np.array([1, 0, 1, 0])
    assert classification_metrics(gold, gold, 2)["macro_f1"] == 1.0
    wrong = classification_metrics(1 - gold, gold, 2)
    assert wrong["accuracy"] == 0.0 and wrong["macro_f1"] == 0.0 and wrong["confusion"] == [[0, 2], [2, 0]]


def test_measure_throughput_times_every_text_in_batches_and_restores_threads():
    seen: list[int] = []

    def predict_proba(batch: list[str]) -> np.ndarray:
        seen.append(len(batch))
        time.sleep(0.001)
        return np.full((len(batch), 2), 0.5)

    threads = torch.get_num_threads()
    texts = [f"text {i}" for i in range(100)]
    docs_per_s = measure_throughput(predict_proba, texts, batch_size=32, threads=1, warmup_batches=2)
    assert torch.get_num_threads() == threads
    # two warm-up batches, then every text once in batches of 32
    assert seen == [32, 32, 32, 32, 32, 4]
    # 4 timed batches of >= 1 ms each: positive and at most 100 docs / 4 ms
    assert 0 < docs_per_s <= 100 / 0.004


def test_measure_throughput_skips_warmup_on_tiny_inputs_and_rejects_none():
    seen: list[int] = []
    rate = measure_throughput(lambda b: seen.append(len(b)) or np.zeros((len(b), 2)), ["a", "b", "c"], batch_size=32)
    assert seen == [3] and rate > 0
    with pytest.raises(ValueError, match="no texts"):
        measure_throughput(lambda b: np.zeros((len(b), 2)), [])


def test_measure_throughput_restores_threads_when_predict_fails():
    threads = torch.get_num_threads()

    def boom(batch: list[str]) -> np.ndarray:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure_throughput(boom, ["a"] * 10, batch_size=4, threads=1 if threads > 1 else 2)
    assert torch.get_num_threads() == threads


def test_repeat_to_cycles_and_cuts():
    assert repeat_to(["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert repeat_to(["a", "b", "c"], 2) == ["a", "b"]
    assert repeat_to(["a", "b"], 0) == []
    assert repeat_to([], 5) == []
    assert len(repeat_to(["x"] * 5, 2000)) == 2000
