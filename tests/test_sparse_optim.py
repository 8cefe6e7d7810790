"""The row-wise table optimizers: the summed row gradient without coalescing, updates confined to the batch's rows,
agreement with a dense reference implementation, and the size of their state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_distill.config import StudentConfig
from sparse_distill.sparse_optim import (
    RowwiseAdagrad,
    RowwiseAdam,
    row_gradient,
    state_numel,
    table_optimizer,
)
from sparse_distill.training import kl_loss, make_optimizers, student_from_config

ROWS, DIM = 40, 6
# Two batches of bags, with repeated ids inside a bag and across bags (one gradient row per occurrence).
BATCHES = [
    (torch.tensor([3, 7, 7, 12, 3]), torch.tensor([0, 3])),
    (torch.tensor([7, 20, 21, 21, 3, 39]), torch.tensor([0, 2, 4])),
    (torch.tensor([12, 12, 5]), torch.tensor([0, 1])),
]


def _grads(weight: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, sparse: bool) -> torch.Tensor:
    """The gradient of a fixed loss of a mean-pooled bag, sparse (uncoalesced) or dense."""
    w = weight.detach().clone().requires_grad_(True)
    pooled = F.embedding_bag(ids, w, offsets, mode="mean", sparse=sparse)
    target = torch.linspace(-1, 1, weight.shape[1])
    ((pooled - target) ** 2).sum().backward()
    return w.grad


def test_row_gradient_sums_occurrences_without_coalescing():
    weight = torch.randn(ROWS, DIM)
    ids, offsets = BATCHES[0]
    sparse = _grads(weight, ids, offsets, sparse=True)
    assert sparse.is_sparse and not sparse.is_coalesced() and sparse._values().shape[0] == len(ids)
    rows, summed = row_gradient(sparse)
    assert rows.tolist() == [3, 7, 12]
    dense = _grads(weight, ids, offsets, sparse=False)
    assert torch.allclose(summed, dense[rows], atol=1e-6)
    rows_d, summed_d = row_gradient(dense)
    assert rows_d.tolist() == [3, 7, 12] and torch.allclose(summed_d, summed, atol=1e-6)
    # The sort-free path (the table's row count known) gives the same rows and sums.
    rows_m, summed_m = row_gradient(sparse, ROWS)
    assert torch.equal(rows_m, rows) and torch.allclose(summed_m, summed, atol=1e-6)


@pytest.mark.parametrize("num_rows", [None, 50, 10_000_000])
def test_distinct_rows_by_mark_or_by_sort(num_rows):
    from sparse_distill.sparse_optim import distinct_rows

    idx = torch.tensor([9, 3, 3, 41, 0, 9, 9])
    rows, inverse = distinct_rows(idx, num_rows)
    assert rows.tolist() == [0, 3, 9, 41] and torch.equal(rows[inverse], idx)


def _reference_adagrad(weight, state, grad, lr, eps=1e-8):
    touched = grad.abs().sum(1) > 0
    state = state + torch.where(touched, grad.pow(2).mean(1), torch.zeros(()))
    update = -lr * grad / (state.sqrt() + eps).unsqueeze(1)
    return weight + torch.where(touched.unsqueeze(1), update, torch.zeros(())), state


def _reference_adam(weight, m, v, grad, lr, t, b1=0.9, b2=0.999, eps=1e-8):
    touched = grad.abs().sum(1) > 0
    m = torch.where(touched.unsqueeze(1), b1 * m + (1 - b1) * grad, m)
    v = torch.where(touched, b2 * v + (1 - b2) * grad.pow(2).mean(1), v)
    update = -lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps).unsqueeze(1)
    return weight + torch.where(touched.unsqueeze(1), update, torch.zeros(())), m, v


OPTIMIZERS = {"rowwise_adagrad": RowwiseAdagrad, "rowwise_adam": RowwiseAdam}


@pytest.mark.parametrize("coalesced", [False, True], ids=["per-occurrence", "per-row"])
@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("name", ["rowwise_adagrad", "rowwise_adam"])
def test_rowwise_optimizers_match_a_dense_reference_and_touch_only_the_batch_rows(name, fused, coalesced):
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(ROWS, DIM))
    lr = 0.05
    opt = OPTIMIZERS[name]([table], lr=lr, fused=fused)
    ref_w = table.detach().clone()
    ref_m, ref_v, ref_s = torch.zeros(ROWS, DIM), torch.zeros(ROWS), torch.zeros(ROWS)
    for t, (ids, offsets) in enumerate(BATCHES, start=1):
        before = table.detach().clone()
        state_before = {k: v.clone() for k, v in opt.state[table].items() if isinstance(v, torch.Tensor)}
        dense_grad = _grads(ref_w, ids, offsets, sparse=False)
        grad = _grads(table.detach(), ids, offsets, sparse=True)
        # Per-row: the gradient summed per distinct row, as the student's compiled backward gives it.
        table.grad = grad.coalesce() if coalesced else grad
        opt.step()
        if name == "rowwise_adagrad":
            ref_w, ref_s = _reference_adagrad(ref_w, ref_s, dense_grad, lr)
            assert torch.allclose(opt.state[table]["sum"], ref_s, atol=1e-6)
        else:
            ref_w, ref_m, ref_v = _reference_adam(ref_w, ref_m, ref_v, dense_grad, lr, t)
            assert torch.allclose(opt.state[table]["exp_avg"], ref_m, atol=1e-6)
            assert torch.allclose(opt.state[table]["exp_avg_sq"], ref_v, atol=1e-7)
        assert torch.allclose(table.detach(), ref_w, atol=1e-5)
        # Rows outside the batch: weights and state bit for bit unchanged.
        outside = torch.ones(ROWS, dtype=torch.bool)
        outside[ids.unique()] = False
        assert torch.equal(table.detach()[outside], before[outside])
        assert not torch.equal(table.detach()[~outside], before[~outside])
        for key, old in state_before.items():
            assert torch.equal(opt.state[table][key][outside], old[outside]), key


@pytest.mark.parametrize("name", ["rowwise_adagrad", "rowwise_adam"])
def test_kernel_and_torch_paths_agree_on_a_realistic_batch(name):
    # Zipf-like ids: many repeats of a few rows, as n-grams occur; several steps so the state matters.
    gen = torch.Generator().manual_seed(1)
    rows, dim = 5_000, 16
    start = torch.randn(rows, dim, generator=gen)
    tables = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    opts = [OPTIMIZERS[name]([t], lr=0.01, fused=fused) for t, fused in zip(tables, (True, False), strict=True)]
    for _ in range(4):
        ids = (torch.rand(3_000, generator=gen) ** 3 * rows).long()
        offsets = torch.arange(0, 3_000, 30)
        for table, opt in zip(tables, opts, strict=True):
            table.grad = _grads(table.detach(), ids, offsets, sparse=True)
            opt.step()
    assert torch.allclose(tables[0].detach(), tables[1].detach(), atol=1e-5)
    for key, value in opts[0].state[tables[0]].items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(value, opts[1].state[tables[1]][key], atol=1e-6), key
    # The kernel's row numbering is left clean for the next step.
    assert all((position == -1).all() for position in opts[0]._positions.values())


def test_state_size_rowwise_against_sparse_adam():
    table = torch.nn.Parameter(torch.randn(ROWS, DIM))
    ids, offsets = BATCHES[0]
    sizes = {}
    for name in ("sparse_adam", "rowwise_adam", "rowwise_adagrad"):
        opt = table_optimizer(name, table, 0.01)
        table.grad = _grads(table.detach(), ids, offsets, sparse=True)
        opt.step()
        sizes[name] = state_numel(opt)
    table_size = ROWS * DIM
    # SparseAdam: two tables (plus its step); row-wise Adam: one table and a float per row; Adagrad: a float per row.
    assert sizes["sparse_adam"] >= 2 * table_size
    assert sizes["rowwise_adam"] == table_size + ROWS
    assert sizes["rowwise_adagrad"] == ROWS


def test_rowwise_optimizers_reject_bad_settings_and_non_tables():
    with pytest.raises(ValueError, match="2-d"):
        RowwiseAdagrad([torch.nn.Parameter(torch.zeros(5))])
    with pytest.raises(ValueError, match="invalid"):
        RowwiseAdam([torch.nn.Parameter(torch.zeros(5, 2))], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="unknown table optimizer"):
        table_optimizer("adamw", torch.nn.Parameter(torch.zeros(5, 2)), 0.1)


@pytest.mark.parametrize("name", ["rowwise_adam", "rowwise_adagrad"])
def test_make_optimizers_with_a_rowwise_table_optimizer_trains_the_student(name):
    torch.manual_seed(0)
    model = student_from_config(50, 2, StudentConfig(dim=8, hidden=16))
    table_opt, dense_opt = make_optimizers(model, lr=0.01, table_lr=0.1, table=name)
    assert type(table_opt).__name__ == {"rowwise_adam": "RowwiseAdam", "rowwise_adagrad": "RowwiseAdagrad"}[name]
    assert isinstance(dense_opt, torch.optim.Adam) and table_opt.param_groups[0]["lr"] == 0.1
    ids, offsets = torch.tensor([1, 2, 3, 10, 11, 12]), torch.tensor([0, 3])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    losses = []
    for _ in range(30):
        loss = kl_loss(model(ids, offsets), targets)
        for opt in (table_opt, dense_opt):
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in (table_opt, dense_opt):
            opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
