"""Compiled (numba) update kernels of the row-wise table optimizers (see `sparse_optim`), for tables on the CPU.

The EmbeddingBag's sparse gradient holds one row per n-gram occurrence (316k rows of 100 floats for 512 IMDB
reviews). The torch path sums them per distinct row (`unique` or a mark pass, then `index_add_` into a new tensor),
gathers the rows' state, computes, and scatters it back: five passes over large temporaries. A kernel does it in
two passes with no temporaries beyond the summed rows: it numbers the distinct rows through a table-long position
array (left all -1 between calls), sums each occurrence into its row, then updates each row and its state in place.
The arithmetic is the torch path's (float32 rows, the per-row mean of the squared gradient); only the order of the
summation differs, so results agree to float rounding. Single-threaded, hence deterministic.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _sum_rows(idx: np.ndarray, values: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of `idx` (in order of first occurrence) and each one's summed gradient. Leaves `position`
    set for those rows: the caller resets it."""
    n, d = values.shape
    rows = np.empty(n, np.int64)
    n_rows = 0
    for k in range(n):
        r = idx[k]
        if position[r] < 0:
            position[r] = n_rows
            rows[n_rows] = r
            n_rows += 1
    summed = np.zeros((n_rows, d), np.float32)
    for k in range(n):
        p = position[idx[k]]
        for j in range(d):
            summed[p, j] += values[k, j]
    return rows[:n_rows], summed


@njit(nogil=True, cache=True)
def rowwise_adagrad_update(
    table: np.ndarray,
    accum: np.ndarray,
    idx: np.ndarray,
    values: np.ndarray,
    lr: float,
    eps: float,
    position: np.ndarray,
) -> int:
    """One row-wise Adagrad step from a raw COO gradient (`idx` rows, `values` one row per occurrence): per distinct
    row, `G_r += mean(g_r^2)`, `w_r -= lr * g_r / (sqrt(G_r) + eps)`. Returns the number of distinct rows."""
    rows, summed = _sum_rows(idx, values, position)
    d = table.shape[1]
    for i in range(len(rows)):
        r = rows[i]
        square = np.float32(0.0)
        for j in range(d):
            square += summed[i, j] * summed[i, j]
        acc = np.float32(accum[r] + square / np.float32(d))
        accum[r] = acc
        scale = np.float32(lr / (math.sqrt(acc) + eps))
        for j in range(d):
            table[r, j] -= scale * summed[i, j]
        position[r] = -1
    return len(rows)


@njit(nogil=True, cache=True)
def rowwise_adam_update(
    table: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    idx: np.ndarray,
    values: np.ndarray,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    bias1: float,
    bias2: float,
    position: np.ndarray,
) -> int:
    """One row-wise Adam step (a full first moment, one second-moment scalar per row), lazy like SparseAdam: only
    the rows the gradient touches move. Returns the number of distinct rows."""
    rows, summed = _sum_rows(idx, values, position)
    d = table.shape[1]
    step_size = np.float32(lr / bias1)
    for i in range(len(rows)):
        r = rows[i]
        square = np.float32(0.0)
        for j in range(d):
            g = summed[i, j]
            exp_avg[r, j] = np.float32(beta1) * exp_avg[r, j] + np.float32(1.0 - beta1) * g
            square += g * g
        v = np.float32(beta2) * exp_avg_sq[r] + np.float32(1.0 - beta2) * (square / np.float32(d))
        exp_avg_sq[r] = v
        denom = np.float32(math.sqrt(v / bias2) + eps)
        for j in range(d):
            table[r, j] -= step_size * exp_avg[r, j] / denom
        position[r] = -1
    return len(rows)


@njit(nogil=True, cache=True)
def bag_backward(
    ids: np.ndarray, offsets: np.ndarray, grad_pooled: np.ndarray, mean: bool, position: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The table gradient of a sum- or mean-pooled embedding bag, summed per distinct row: the rows (ascending) and
    their gradients, `sum over occurrences of grad_pooled[doc] (/ len(doc) for mean)`. Reads the small pooled
    gradient once per occurrence instead of writing a gradient row per occurrence as EmbeddingBag's backward does.
    Leaves `position` all -1, as it found it."""
    n, n_docs = len(ids), len(offsets)
    d = grad_pooled.shape[1]
    # The distinct rows in ascending order (a sparse tensor's coalesced form): mark, then sort the marked rows.
    rows = np.empty(n, np.int64)
    n_rows = 0
    for k in range(n):
        r = ids[k]
        if position[r] < 0:
            position[r] = 0
            rows[n_rows] = r
            n_rows += 1
    rows = np.sort(rows[:n_rows])
    for i in range(n_rows):
        position[rows[i]] = i
    summed = np.zeros((n_rows, d), np.float32)
    for doc in range(n_docs):
        start = offsets[doc]
        stop = offsets[doc + 1] if doc + 1 < n_docs else n
        if stop <= start:
            continue
        scale = np.float32(1.0 / (stop - start)) if mean else np.float32(1.0)
        for k in range(start, stop):
            p = position[ids[k]]
            for j in range(d):
                summed[p, j] += scale * grad_pooled[doc, j]
    for i in range(n_rows):
        position[rows[i]] = -1
    return rows, summed
