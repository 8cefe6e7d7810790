"""The KL loss, the optimisers (SparseAdam touches only the batch's rows) and a learning sanity check."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sparse_distill.config import StudentConfig, TrainConfig
from sparse_distill.training import InMemoryBatches, kl_loss, make_optimizers, student_from_config, train_student
from sparse_distill.vocab import build_vocab


def test_kl_loss_is_zero_at_the_teacher_and_matches_the_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    p = F.softmax(logits, -1)
    assert kl_loss(logits, p).item() < 1e-6
    s = torch.tensor([[0.1, 0.2, 0.3], [1.0, -2.0, 0.0]])
    q = F.softmax(s, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(kl_loss(s, p), expected, atol=1e-6)


def test_kl_loss_with_one_hot_targets_is_cross_entropy_and_temperature_scales():
    s = torch.tensor([[0.3, -0.2], [1.5, 0.1]])
    onehot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(kl_loss(s, onehot), F.cross_entropy(s, torch.tensor([0, 1])), atol=1e-6)
    p = F.softmax(torch.tensor([[2.0, 0.0]]), -1)
    t2 = kl_loss(torch.tensor([[0.0, 0.0]]), p, temperature=2.0)
    pt = F.softmax(torch.tensor([[1.0, 0.0]]), -1)
    expected = 4 * (pt * (pt.log() - np.log(0.5))).sum()
    assert torch.allclose(t2, expected, atol=1e-5)


def test_sparse_adam_updates_only_rows_in_the_batch():
    torch.manual_seed(0)
    model = student_from_config(50, 2, StudentConfig(dim=8, hidden=32))
    before = model.embedding.weight.detach().clone()
    dense_before = model.fc1.weight.detach().clone()
    optimizers = make_optimizers(model, lr=0.1)
    assert isinstance(optimizers[0], torch.optim.SparseAdam) and isinstance(optimizers[1], torch.optim.Adam)
    ids, offsets = torch.tensor([3, 7, 7, 12]), torch.tensor([0, 2])
    loss = kl_loss(model(ids, offsets), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    loss.backward()
    grad = model.embedding.weight.grad
    assert grad.is_sparse and grad.coalesce().indices().flatten().tolist() == [3, 7, 12]
    for opt in optimizers:
        opt.step()
    changed = (model.embedding.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    # Rows outside the batch are untouched (a row inside could only stay put if its gradient were exactly zero).
    assert changed and set(changed) <= {3, 7, 12}
    assert not torch.equal(model.fc1.weight.detach(), dense_before)


def test_param_counts():
    model = student_from_config(1000, 3, StudentConfig(dim=10, hidden=5))
    counts = model.param_counts()
    assert counts == {"sparse": 10_000, "dense": 10 * 5 + 5 + 5 * 3 + 3, "total": 10_000 + 73}


def test_training_learns_a_bag_of_words_task():
    texts = ["good fine great"] * 20 + ["bad awful poor"] * 20
    labels = [1] * 20 + [0] * 20
    vocab = build_vocab(texts, 100, 2)
    model = student_from_config(len(vocab), 2, StudentConfig(dim=8, hidden=8, pooling="max"))
    saved = []
    res = train_student(
        model,
        vocab,
        InMemoryBatches.from_labels(texts, labels, 2),
        ["great", "awful"],
        [1, 0],
        TrainConfig(lr=0.05, batch_size=8, epochs=10, eval_every=10),
        saved.append,
    )
    assert res.best_dev_accuracy == 1.0 and saved
