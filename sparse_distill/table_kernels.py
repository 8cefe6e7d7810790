"""Compiled (numba) update kernels of the row-wise table optimizers (see `sparse_optim`), for tables on the CPU.

The EmbeddingBag's sparse gradient holds one row per n-gram occurrence (316k rows of 100 floats for 512 IMDB
reviews). The torch path sums them per distinct row (`unique` or a mark pass, then `index_add_` into a new tensor),
gathers the rows' state, computes, and scatters it back: five passes over large temporaries. A kernel does it in
two passes with no temporaries beyond the summed rows: it numbers the distinct rows through a table-long position
array (left all -1 between calls), sums each occurrence into its row, then updates each row and its state in place.
The arithmetic is the torch path's (float32 rows, the per-row mean of the squared gradient); only the order of the
summation differs, so results agree to float rounding.

A gradient already summed per distinct row (the compiled `bag_backward`'s) skips the summing pass (`sum_rows`). The row
updates and `bag_backward`'s sums run in parallel over rows (numba threads, `numba.get_num_threads()`); each row is
still summed by one thread in one order, so results do not depend on the thread count and a run stays deterministic.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

# numba's fallback threading layer (workqueue, where neither OpenMP nor TBB loads) must not be entered by two
# threads at once, e.g. two trainings in one process under a thread task runner: callers hold this lock.
PARALLEL_LOCK = threading.Lock()


@njit(nogil=True, cache=True)
def sum_rows(idx: np.ndarray, values: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of `idx` (in order of first occurrence) and each one's summed gradient. Leaves `position`
    all -1, as it found it."""
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
    for i in range(n_rows):
        position[rows[i]] = -1
    return rows[:n_rows], summed


@njit(nogil=True, cache=True, parallel=True)
def rowwise_adagrad_rows(
    table: np.ndarray, accum: np.ndarray, rows: np.ndarray, summed: np.ndarray, lr: float, eps: float
) -> None:
    """One row-wise Adagrad step from a gradient summed per distinct row (`rows` distinct, `summed[i]` row `rows[i]`'s
    gradient): `G_r += mean(g_r^2)`, `w_r -= lr * g_r / (sqrt(G_r) + eps)`."""
    d = table.shape[1]
    for i in prange(len(rows)):
        r = rows[i]
        square = np.float32(0.0)
        for j in range(d):
            square += summed[i, j] * summed[i, j]
        acc = np.float32(accum[r] + square / np.float32(d))
        accum[r] = acc
        scale = np.float32(lr / (math.sqrt(acc) + eps))
        for j in range(d):
            table[r, j] -= scale * summed[i, j]


@njit(nogil=True, cache=True, parallel=True)
def rowwise_adam_rows(
    table: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    rows: np.ndarray,
    summed: np.ndarray,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    bias1: float,
    bias2: float,
) -> None:
    """One row-wise Adam step (a full first moment, one second-moment scalar per row) from a gradient summed per
    distinct row; lazy like SparseAdam: only the rows in `rows` move."""
    d = table.shape[1]
    step_size = np.float32(lr / bias1)
    for i in prange(len(rows)):
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


@dataclass(frozen=True)
class BagGradient:
    """The table gradient of a pooled embedding bag, factored: row `rows[i]`'s gradient is the sum of
    `grad[docs[q]]` for q in `starts[i]:starts[i + 1]` (`grad`: the pooled gradient, already divided by each bag's
    size for mean pooling). A few MB where the summed rows are |rows| x d floats (610 MB for 512 IMDB reviews at
    d = 1000): a fused update (`rowwise_adam_bag`, `rowwise_adagrad_bag`) sums each row and applies it at once."""

    rows: np.ndarray
    starts: np.ndarray
    docs: np.ndarray
    grad: np.ndarray

    def summed(self) -> np.ndarray:
        """The gradient summed per row, `(len(rows), d)`."""
        out = np.empty((len(self.rows), self.grad.shape[1]), np.float32)
        _sum_docs_per_row(self.starts, self.docs, self.grad, out)
        return out


# Which documents touch each distinct row of a batch (`rows`, `starts`, `docs` as in `BagGradient`): it depends on the
# batch's ids alone, so the training loop's prefetch thread can make it ahead of the step (`bag_plan`).
BagPlan = tuple[np.ndarray, np.ndarray, np.ndarray]


def bag_plan(ids: np.ndarray, offsets: np.ndarray, position: np.ndarray) -> BagPlan:
    """The distinct rows of a batch of bags (ascending) and each one's documents, grouped by row in the order they
    come. Leaves `position` (table-long, all -1) as it found it."""
    rows = _number_sorted_rows(ids, position)
    # Occurrences grouped by row (a counting sort), so each row's sum is written once, in order, by one thread;
    # scattering straight into the rows missed the cache at every occurrence.
    starts, docs = _docs_by_row(ids, offsets, position, len(rows))
    position[rows] = -1
    return rows, starts, docs


def bag_gradient(
    ids: np.ndarray,
    offsets: np.ndarray,
    grad_pooled: np.ndarray,
    mean: bool,
    position: np.ndarray,
    plan: BagPlan | None = None,
) -> BagGradient:
    """The table gradient of a sum- or mean-pooled embedding bag, factored (see `BagGradient`); the rows ascending.
    `plan`: the batch's `bag_plan`, when made already. Leaves `position` all -1, as it found it."""
    rows, starts, docs = plan if plan is not None else bag_plan(ids, offsets, position)
    sizes = np.diff(np.append(offsets, len(ids))).astype(np.float32)
    scaled = grad_pooled / np.maximum(sizes, 1)[:, None] if mean else grad_pooled
    return BagGradient(rows, starts, docs, np.ascontiguousarray(scaled, np.float32))


def bag_backward(
    ids: np.ndarray, offsets: np.ndarray, grad_pooled: np.ndarray, mean: bool, position: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The table gradient of a sum- or mean-pooled embedding bag, summed per distinct row: the rows (ascending) and
    their gradients, `sum over occurrences of grad_pooled[doc] (/ len(doc) for mean)`. Reads the small pooled
    gradient once per occurrence instead of writing a gradient row per occurrence as EmbeddingBag's backward does.
    Leaves `position` all -1, as it found it."""
    grad = bag_gradient(ids, offsets, grad_pooled, mean, position)
    return grad.rows, grad.summed()


# Rows are cut into this many contiguous chunks for the fused updates' threads: each chunk sums its rows' gradients
# into one scratch vector, so no row needs an allocation, and 64 chunks keep 2-16 threads evenly loaded.
_CHUNKS = 64


@njit(nogil=True, cache=True, inline="always")
def _sum_row(out: np.ndarray, i: int, starts: np.ndarray, docs: np.ndarray, grad: np.ndarray) -> None:
    """`out = sum of grad[doc] over row i's occurrences` (`BagGradient`'s grouping), in occurrence order: every kernel
    sums a row the same way, so fused and unfused updates give the same floats."""
    for j in range(len(out)):
        out[j] = np.float32(0.0)
    for q in range(starts[i], starts[i + 1]):
        doc = docs[q]
        for j in range(len(out)):
            out[j] += grad[doc, j]


@njit(nogil=True, cache=True, parallel=True)
def rowwise_adam_bag(
    table: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    rows: np.ndarray,
    starts: np.ndarray,
    docs: np.ndarray,
    grad: np.ndarray,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    bias1: float,
    bias2: float,
) -> None:
    """`rowwise_adam_rows` from a factored gradient (`BagGradient`): each row's gradient is summed (in the same
    order as `BagGradient.summed`) and applied at once, never written out. The same arithmetic, so the same weights."""
    n, d = len(rows), table.shape[1]
    step_size = np.float32(lr / bias1)
    chunks = min(n, _CHUNKS)
    for c in prange(chunks):
        g = np.empty(d, np.float32)
        for i in range(c * n // chunks, (c + 1) * n // chunks):
            _sum_row(g, i, starts, docs, grad)
            r = rows[i]
            square = np.float32(0.0)
            for j in range(d):
                exp_avg[r, j] = np.float32(beta1) * exp_avg[r, j] + np.float32(1.0 - beta1) * g[j]
                square += g[j] * g[j]
            v = np.float32(beta2) * exp_avg_sq[r] + np.float32(1.0 - beta2) * (square / np.float32(d))
            exp_avg_sq[r] = v
            denom = np.float32(math.sqrt(v / bias2) + eps)
            for j in range(d):
                table[r, j] -= step_size * exp_avg[r, j] / denom


@njit(nogil=True, cache=True, parallel=True)
def rowwise_adagrad_bag(
    table: np.ndarray,
    accum: np.ndarray,
    rows: np.ndarray,
    starts: np.ndarray,
    docs: np.ndarray,
    grad: np.ndarray,
    lr: float,
    eps: float,
) -> None:
    """`rowwise_adagrad_rows` from a factored gradient (`BagGradient`), each row summed and applied at once."""
    n, d = len(rows), table.shape[1]
    chunks = min(n, _CHUNKS)
    for c in prange(chunks):
        g = np.empty(d, np.float32)
        for i in range(c * n // chunks, (c + 1) * n // chunks):
            _sum_row(g, i, starts, docs, grad)
            r = rows[i]
            square = np.float32(0.0)
            for j in range(d):
                square += g[j] * g[j]
            acc = np.float32(accum[r] + square / np.float32(d))
            accum[r] = acc
            scale = np.float32(lr / (math.sqrt(acc) + eps))
            for j in range(d):
                table[r, j] -= scale * g[j]


@njit(nogil=True, cache=True)
def _number_sorted_rows(ids: np.ndarray, position: np.ndarray) -> np.ndarray:
    """The distinct rows of `ids` in ascending order (a sparse tensor's coalesced form), each numbered in `position`."""
    rows = np.empty(len(ids), np.int64)
    n_rows = 0
    for k in range(len(ids)):
        r = ids[k]
        if position[r] < 0:
            position[r] = 0
            rows[n_rows] = r
            n_rows += 1
    if len(position) <= 64 * len(ids):
        # A scan of the marks gives the rows in order without sorting: 5 ms against the sort's 25 ms for a
        # 512-review batch (206k distinct rows of 1M); for a table far larger than the batch, sort instead.
        i = 0
        for r in range(len(position)):
            if position[r] == 0:  # marked (the row numbered 0 is behind the scan already)
                rows[i] = r
                position[r] = i
                i += 1
        return rows[:n_rows]
    rows = np.sort(rows[:n_rows])
    for i in range(n_rows):
        position[rows[i]] = i
    return rows


@njit(nogil=True, cache=True)
def _docs_by_row(
    ids: np.ndarray, offsets: np.ndarray, position: np.ndarray, n_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each occurrence's document, grouped by its row's number (`docs[starts[i]:starts[i + 1]]` for row i), in the
    order the occurrences come."""
    n, n_docs = len(ids), len(offsets)
    starts = np.zeros(n_rows + 1, np.int64)
    for k in range(n):
        starts[position[ids[k]] + 1] += 1
    for i in range(n_rows):
        starts[i + 1] += starts[i]
    fill = starts[:-1].copy()
    docs = np.empty(n, np.int64)
    for doc in range(n_docs):
        stop = offsets[doc + 1] if doc + 1 < n_docs else n
        for k in range(offsets[doc], stop):
            p = position[ids[k]]
            docs[fill[p]] = doc
            fill[p] += 1
    return starts, docs


@njit(nogil=True, cache=True, parallel=True)
def _sum_docs_per_row(starts: np.ndarray, docs: np.ndarray, grad_pooled: np.ndarray, summed: np.ndarray) -> None:
    """`summed[i] = sum of grad_pooled[doc] over row i's occurrences`, rows in parallel."""
    for i in prange(len(starts) - 1):
        _sum_row(summed[i], i, starts, docs, grad_pooled)
