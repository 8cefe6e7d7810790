"""The KL loss, the optimisers (SparseAdam touches only the batch's rows), a learning sanity check, the step budget,
the learning-rate schedule, the training loop (early stopping, best checkpoint, evaluate_first) and train_dan."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparse_distill import training
from sparse_distill.config import PipelineConfig, StudentConfig, TrainConfig
from sparse_distill.data import LabelMap
from sparse_distill.student import load_student, split_member
from sparse_distill.training import (
    AUTO_DOCS_SEEN,
    AUTO_EVALS,
    AUTO_MAX_EPOCHS,
    AUTO_MIN_EPOCHS,
    InMemoryBatches,
    WeightAverage,
    accuracy,
    fit,
    kl_loss,
    logit_mse_loss,
    lr_scale,
    make_optimizers,
    plan_budget,
    student_from_config,
    to_tensors,
    train_dan,
    train_student,
)
from sparse_distill.vocab import NgramVocab, build_vocab


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


def test_logit_mse_loss_is_zero_at_the_teachers_logits_whatever_their_offset_and_keeps_pulling_when_sure():
    teacher_logits = torch.tensor([[4.0, -2.0, 1.0], [0.0, 0.0, 9.0]])
    p = F.softmax(teacher_logits, -1)
    assert logit_mse_loss(teacher_logits + 5.0, p).item() < 1e-8
    # Both put nearly all mass on class 0, so KL barely moves; the logits still differ by a margin of 8 against 12.
    sure, surer = torch.tensor([[4.0, -4.0]], requires_grad=True), F.softmax(torch.tensor([[6.0, -6.0]]), -1)
    assert kl_loss(sure, surer).item() < 1e-3
    loss = logit_mse_loss(sure, surer)
    assert torch.allclose(loss, torch.tensor(4.0), atol=1e-3)  # centred: (4 - 6)^2 on each class
    loss.backward()
    assert sure.grad[0, 0] < 0 < sure.grad[0, 1]  # towards a wider margin


def test_sparse_adam_updates_only_rows_in_the_batch():
    torch.manual_seed(0)
    model = student_from_config(50, 2, StudentConfig(dim=8, hidden=32, members=1))
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
    model = student_from_config(1000, 3, StudentConfig(dim=10, hidden=5, members=1))
    counts = model.param_counts()
    assert counts == {"sparse": 10_000, "dense": 10 * 5 + 5 + 5 * 3 + 3, "total": 10_000 + 73}


def test_training_learns_a_bag_of_words_task():
    texts = ["good fine great"] * 20 + ["bad awful poor"] * 20
    labels = [1] * 20 + [0] * 20
    vocab = build_vocab(texts, 100, 2)
    model = student_from_config(len(vocab), 2, StudentConfig(dim=8, hidden=8, pooling="max", members=1))
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


# --- the step budget and the learning-rate schedule ------------------------------------------------------------------


def test_plan_budget_max_steps_wins_over_epochs_and_epochs_over_auto():
    b = plan_budget(1000, TrainConfig(batch_size=10, epochs=3.0, max_steps=7))
    assert b.steps == 7 and "max_steps" in b.reason
    b = plan_budget(1000, TrainConfig(batch_size=8, epochs=2.5))
    assert b.steps == math.ceil(2.5 * 1000 / 8) == 313 and "epochs" in b.reason
    assert b.epochs == pytest.approx(313 / 125)  # steps over batches per pass
    assert plan_budget(3, TrainConfig(batch_size=8, epochs=0.1)).steps == 1  # never 0 steps


@pytest.mark.parametrize("num_docs", [10, 1_000, 50_000, 100_000, 2_000_000])
def test_plan_budget_auto_passes_and_docs_seen(num_docs):
    batch = 64
    b = plan_budget(num_docs, TrainConfig(batch_size=batch))
    assert b.reason.startswith("auto")
    passes = b.steps * batch / num_docs  # documents seen over the data size
    assert AUTO_MIN_EPOCHS <= passes <= AUTO_MAX_EPOCHS + batch / num_docs  # ceil adds at most one batch
    if AUTO_MIN_EPOCHS * num_docs < AUTO_DOCS_SEEN < AUTO_MAX_EPOCHS * num_docs:
        assert b.steps * batch == pytest.approx(AUTO_DOCS_SEEN, abs=batch)  # in between: about the target docs
    elif num_docs < AUTO_DOCS_SEEN / AUTO_MAX_EPOCHS:
        assert passes == pytest.approx(AUTO_MAX_EPOCHS, abs=batch / num_docs)  # small data: the most passes
    else:
        assert passes == pytest.approx(AUTO_MIN_EPOCHS, abs=batch / num_docs)  # big data: the fewest passes
    assert f"{num_docs:,}" in b.reason


def test_plan_budget_auto_grows_with_the_data_until_docs_seen_caps_it():
    steps = [plan_budget(n, TrainConfig(batch_size=100)).steps for n in (1_000, 10_000, 100_000, 1_000_000)]
    assert steps[0] < steps[1] < steps[2] < steps[3]
    assert steps[1] == steps[0] * 10  # both at AUTO_MAX_EPOCHS passes
    assert steps[2] == math.ceil(AUTO_DOCS_SEEN / 100)  # 15 passes: the docs-seen target
    assert steps[3] == math.ceil(AUTO_MIN_EPOCHS * 1_000_000 / 100)  # 1.5 passes would be too few


def test_plan_budget_eval_every_default_and_explicit():
    # Big data: about AUTO_EVALS evaluations over the budget, well within one pass.
    b = plan_budget(1_000_000, TrainConfig(batch_size=100, max_steps=4000))
    assert b.eval_every == 4000 // AUTO_EVALS and b.steps / b.eval_every == pytest.approx(AUTO_EVALS, abs=1)
    # Small data: at most one pass between evaluations (here fewer than AUTO_EVALS evaluations would be needed).
    b = plan_budget(50, TrainConfig(batch_size=10, max_steps=4000))
    assert b.eval_every == 5  # one pass of 5 batches
    b = plan_budget(1000, TrainConfig(batch_size=10, epochs=100))  # 10_000 steps, 100 per pass
    assert b.eval_every == min(100, math.ceil(10_000 / AUTO_EVALS)) == 100
    assert plan_budget(10, TrainConfig(batch_size=10, max_steps=3)).eval_every == 1
    # An explicit eval_every wins, even over one pass.
    assert plan_budget(50, TrainConfig(batch_size=10, max_steps=4000, eval_every=123)).eval_every == 123


def test_lr_scale_warmup_is_linear_up_to_one():
    scales = [lr_scale(s, 100, "linear", 10) for s in range(10)]
    assert scales == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_scale(10, 100, "linear", 10) == 1.0  # the first step after warm-up: full rate
    assert lr_scale(0, 100, "constant", 0) == 1.0  # no warm-up: full rate at once


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_scale_after_warmup_is_non_increasing(schedule):
    total, warmup = 210, 10
    scales = [lr_scale(s, total, schedule, warmup) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(scales, scales[1:], strict=False))
    assert scales[0] == pytest.approx(1.0) and all(0.0 <= s <= 1.0 for s in scales)
    if schedule == "constant":
        assert set(scales) == {1.0}
    else:
        assert lr_scale(total - 1, total, schedule, warmup) < 0.01  # the last step: ~0
        assert lr_scale(total, total, schedule, warmup) == pytest.approx(0.0, abs=1e-12)
        assert scales[50] < 1.0  # decays in between
    if schedule == "cosine":
        assert lr_scale(warmup + 100, total, "cosine", warmup) == pytest.approx(0.5)  # half-way through the decay
        assert lr_scale(warmup + 50, total, "cosine", warmup) > lr_scale(warmup + 50, total, "linear", warmup)
    if schedule == "linear":
        assert lr_scale(warmup + 100, total, "linear", warmup) == pytest.approx(0.5)
        assert lr_scale(warmup + 150, total, "linear", warmup) == pytest.approx(0.25)


# --- the training loop ----------------------------------------------------------------------------------------------


class CountingBatches:
    """`num_docs` fake documents in batches; the loop sees only the number of batches."""

    def __init__(self, num_docs: int):
        self.num_docs = num_docs

    def epoch(self, epoch: int, batch_size: int):
        for i in range(0, self.num_docs, batch_size):
            n = min(batch_size, self.num_docs - i)
            yield [f"doc {j}" for j in range(i, i + n)], np.zeros((n, 2), np.float32)


def _scripted_fit(accuracies, config, evaluate_first=False):
    """fit over a one-parameter model with a scripted dev accuracy; returns the result, save and eval steps.
    Weight averaging is off: each evaluation is one scripted score."""
    config = config.model_copy(update={"average_window": 0.0})
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.1)
    state = {"step": 0}
    saved, evaluated = [], []

    def train_step(_batch):
        state["step"] += 1
        return (w - 1.0).pow(2).sum()

    def evaluate():
        evaluated.append(state["step"])
        return accuracies[len(evaluated) - 1]

    res = fit(
        [opt],
        train_step,
        evaluate,
        lambda: saved.append(state["step"]),
        CountingBatches(100),
        config,
        evaluate_first=evaluate_first,
    )
    return res, saved, evaluated


def test_fit_stops_after_patience_evaluations_without_improvement():
    accs = [0.5, 0.6, 0.6, 0.55, 0.6, 0.9, 0.9, 0.9]
    res, saved, evaluated = _scripted_fit(accs, TrainConfig(batch_size=10, max_steps=100, eval_every=2, patience=3))
    assert evaluated == [2, 4, 6, 8, 10]  # 0.6 at step 4, then three evaluations that do not beat it
    assert res.steps == 10 and len(res.history) == 5 and res.budget["early_stopped"] is True
    assert [h["step"] for h in res.history] == evaluated
    assert saved == [2, 4]  # save_best exactly when dev improves (a tie is no improvement)
    assert res.best_step == 4 and res.best_dev_accuracy == 0.6
    assert res.budget["steps"] == 100 and res.budget["eval_every"] == 2


def test_fit_without_patience_trains_the_whole_budget():
    accs = [0.5, 0.4, 0.4, 0.4, 0.4, 0.7]
    res, saved, evaluated = _scripted_fit(accs, TrainConfig(batch_size=10, max_steps=28, eval_every=5, patience=None))
    assert evaluated == [5, 10, 15, 20, 25, 28]  # and once more at the last step
    assert res.steps == 28 and res.budget["early_stopped"] is False
    assert saved == [5, 28] and res.best_step == 28 and res.best_dev_accuracy == 0.7


def test_fit_improvement_resets_patience():
    accs = [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.3]
    res, saved, _ = _scripted_fit(accs, TrainConfig(batch_size=10, max_steps=100, eval_every=1, patience=2))
    assert res.steps == 7 and saved == [1, 3, 5] and res.budget["early_stopped"] is True


def test_fit_evaluate_first_scores_the_starting_model():
    accs = [0.8, 0.7, 0.75, 0.8]
    res, saved, evaluated = _scripted_fit(
        accs, TrainConfig(batch_size=10, max_steps=3, eval_every=1, patience=None), evaluate_first=True
    )
    assert evaluated == [0, 1, 2, 3] and saved == [0]  # 0.8 at the end only ties the start
    assert res.best_step == 0 and res.best_dev_accuracy == 0.8 and res.history[0] == {"step": 0, "dev_accuracy": 0.8}


def test_weight_average_is_an_exponential_average_swapped_in_without_copies():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    average = WeightAverage([w], decay=0.75)
    average.update()  # the first update copies
    with torch.no_grad():
        w.copy_(torch.tensor([5.0, 6.0]))
    average.update()
    # Bias-corrected: (1 - d) * (d * w1 + w2) / (1 - d^2) = (d * w1 + w2) / (1 + d).
    expected = (0.75 * torch.tensor([1.0, 2.0]) + torch.tensor([5.0, 6.0])) / 1.75
    storage = w.data_ptr()
    with pytest.raises(RuntimeError, match="boom"), average.swapped():
        assert torch.allclose(w, expected)
        raise RuntimeError("boom")
    assert w.data_ptr() == storage and torch.equal(w, torch.tensor([5.0, 6.0]))  # back, even after an error
    restored = WeightAverage([w], decay=0.75)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 2
    with restored.swapped():
        assert torch.allclose(w, expected)
    empty = WeightAverage([w], decay=0.75)
    empty.load_state_dict(WeightAverage([w], 0.75).state_dict())  # a checkpoint from before the first evaluation
    assert empty.updates == 0 and empty.average == []


def test_fit_scores_and_keeps_the_averaged_weights():
    # SGD jumps the weight to +1 or -1 every step; dev prefers weights near 0, where only the average is.
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.5)
    state = {"step": 0}
    saved = []

    def train_step(_batch):
        state["step"] += 1
        return (w - (1.0 if state["step"] % 2 else -1.0)).pow(2).sum()

    config = TrainConfig(batch_size=10, max_steps=9, eval_every=3, patience=None, schedule="constant", warmup_ratio=0)
    # A window of 3 / (9 ln 2) of the 9-step budget: the average halves at each evaluation (every 3 steps).
    averaged = config.model_copy(update={"average_window": 3 / (9 * math.log(2))})
    res = fit(
        [opt],
        train_step,
        lambda: 1.0 - abs(w.item()) / 2,
        lambda: saved.append(w.item()),
        CountingBatches(100),
        averaged,
    )
    # The weights at steps 3, 6, 9: +1, -1, +1; their bias-corrected average: +1, (1 * 0.5 - 1) / 1.5 = -1/3,
    # then 3/7 (the snapshots weigh 1/7, 2/7 and 4/7).
    assert [h["dev_accuracy"] for h in res.history] == pytest.approx([0.5, 1 - 1 / 6, 1 - 3 / 14])
    assert saved == pytest.approx([1.0, -1 / 3]) and res.best_step == 6
    assert w.item() == 1.0  # training's own weights are back in the model
    off = fit(
        [opt],
        train_step,
        lambda: 1.0 - abs(w.item()) / 2,
        lambda: None,
        CountingBatches(100),
        config.model_copy(update={"average_window": 0.0}),
    )
    assert [h["dev_accuracy"] for h in off.history] == [0.5, 0.5, 0.5]


def _separable(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > 0).long()
    return x, y


@pytest.mark.parametrize("evaluate_first", [True, False])
def test_fit_keeps_the_starting_model_when_training_only_makes_it_worse(evaluate_first):
    x, y = _separable()
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():  # a perfect starting model
        model.weight.copy_(torch.tensor([[-5.0, 0.0], [5.0, 0.0]]))
        model.bias.zero_()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    best = {}

    def evaluate():
        with torch.no_grad():
            return float((model(x).argmax(-1) == y).float().mean())

    def train_step(_batch):
        return model.weight[1, 0] - model.weight[0, 0]  # the margin of the right class: minimising it unlearns

    res = fit(
        [torch.optim.SGD(model.parameters(), lr=5.0)],
        train_step,
        evaluate,
        lambda: best.update({k: v.clone() for k, v in model.state_dict().items()}),
        CountingBatches(40),
        TrainConfig(batch_size=10, max_steps=8, eval_every=2, patience=None, schedule="constant", warmup_ratio=0),
        evaluate_first=evaluate_first,
    )
    assert evaluate() < 1.0  # training did make it worse
    if evaluate_first:
        assert res.best_step == 0 and res.best_dev_accuracy == 1.0
        assert all(torch.equal(best[k], start[k]) for k in start)
    else:  # without the first look, the worse model is the best one seen
        assert res.best_step > 0 and res.best_dev_accuracy < 1.0


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_fit_sets_each_group_lr_by_the_schedule_and_table_lr_reaches_sparse_adam(schedule):
    torch.manual_seed(0)
    model = student_from_config(30, 2, StudentConfig(dim=4, hidden=4, members=1))
    optimizers = make_optimizers(model, lr=0.01, table_lr=0.5)
    assert optimizers[0].param_groups[0]["lr"] == 0.5 and optimizers[1].param_groups[0]["lr"] == 0.01
    seen = []
    ids, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 2])

    def train_step(_batch):
        seen.append((optimizers[0].param_groups[0]["lr"], optimizers[1].param_groups[0]["lr"]))
        return kl_loss(model(ids, offsets), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))

    config = TrainConfig(batch_size=10, max_steps=40, eval_every=40, schedule=schedule, warmup_ratio=0.1)
    res = fit(optimizers, train_step, lambda: 0.5, lambda: None, CountingBatches(35), config)
    assert res.steps == 40 and len(seen) == 40
    for step, (table, dense) in enumerate(seen):
        scale = lr_scale(step, 40, schedule, 4)
        assert table == pytest.approx(0.5 * scale) and dense == pytest.approx(0.01 * scale)
    assert seen[0][1] == pytest.approx(0.01 / 4) and seen[3][1] == pytest.approx(0.01)  # warm-up of 4 steps


def test_make_optimizers_table_lr_defaults_to_lr():
    model = student_from_config(30, 2, StudentConfig(dim=4, hidden=4, members=1))
    sparse, dense = make_optimizers(model, lr=0.02)
    assert sparse.param_groups[0]["lr"] == 0.02 and dense.param_groups[0]["lr"] == 0.02


def test_train_student_passes_table_lr_to_the_optimizers(monkeypatch):
    from sparse_distill import training

    calls = []
    real = training.make_optimizers

    def spy(model, lr, table_lr=None, table="sparse_adam"):
        calls.append((lr, table_lr, table))
        return real(model, lr, table_lr, table)

    monkeypatch.setattr(training, "make_optimizers", spy)
    texts, labels = ["good fine", "bad awful"] * 4, [1, 0] * 4
    vocab = build_vocab(texts, 50, 1)
    model = student_from_config(len(vocab), 2, StudentConfig(dim=4, hidden=4, members=1))
    cfg = TrainConfig(lr=0.003, table_lr=0.3, batch_size=4, max_steps=2, table_optimizer="rowwise_adagrad")
    train_student(model, vocab, InMemoryBatches.from_labels(texts, labels, 2), texts, labels, cfg, lambda m: None)
    assert calls == [(0.003, 0.3, "rowwise_adagrad")]


# --- train_dan: a model folder and its record -------------------------------------------------------------------------


POS_WORDS, NEG_WORDS = ["good", "fine", "great"], ["bad", "awful", "poor"]


def _easy_task(tmp_path):
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for i in range(60):
        words = list(rng.choice(POS_WORDS if i % 2 else NEG_WORDS, 2)) + list(rng.choice(["the", "a", "film"], 2))
        texts.append(" ".join(words))
        labels.append(i % 2)
    vocab_dir = tmp_path / "vocab"
    build_vocab(texts, 100, 2).save(vocab_dir)
    return texts, labels, vocab_dir


def test_train_dan_writes_a_loadable_student_and_its_record(tmp_path):
    texts, labels, vocab_dir = _easy_task(tmp_path)
    label_map = LabelMap(("neg", "pos"))
    data = InMemoryBatches.from_labels(texts, labels, 2)
    cfg = TrainConfig(lr=0.05, batch_size=8, max_steps=40, eval_every=10)
    rec = train_dan(
        tmp_path / "kd",
        vocab_dir,
        data,
        texts[:20],
        labels[:20],
        label_map,
        StudentConfig(dim=8, hidden=8, members=1),
        cfg,
    )
    assert set(rec) >= {"model_dir", "dev_accuracy", "best_step", "steps", "seconds", "params", "budget"}
    assert rec["model_dir"] == str(tmp_path / "kd" / "model")
    assert rec["dev_accuracy"] == 1.0 and rec["steps"] == 40 and 0 < rec["best_step"] <= 40
    assert rec["budget"]["steps"] == 40 and rec["budget"]["reason"] == "max_steps set"
    assert rec["params"]["total"] > 0 and rec["seconds"] >= 0
    model, lm = load_student(rec["model_dir"], mmap=False)
    assert lm == label_map and model.config.dim == 8 and model.param_counts() == rec["params"]
    vocab = NgramVocab.load(rec["model_dir"])
    assert accuracy(model, *to_tensors(vocab, texts[:20]), np.asarray(labels[:20])) == 1.0


def test_members_train_one_at_a_time_with_their_own_seeds_and_a_killed_stage_resumes_at_the_next(
    tmp_path, caplog, monkeypatch
):
    texts, labels, vocab_dir = _easy_task(tmp_path)
    label_map = LabelMap(("neg", "pos"))
    cfg = TrainConfig(lr=0.05, batch_size=8, max_steps=30, eval_every=10, checkpoint_every_minutes=None)

    def run(out, student, train_cfg=cfg, init_model=None, resume_key="stage-fp"):
        data = InMemoryBatches.from_labels(texts, labels, 2)
        return train_dan(
            out,
            vocab_dir,
            data,
            texts[:20],
            labels[:20],
            label_map,
            student,
            train_cfg,
            init_model,
            resume_key=resume_key,
        )

    rec = run(tmp_path / "kd", StudentConfig(dim=9, hidden=8, members=2))
    model, _ = load_student(rec["model_dir"], mmap=False)
    # dim 9 in 2 members: 4 columns each.
    assert model.config.members == 2 and model.config.dim == 8 and len(rec["members"]) == 2
    assert rec["dev_accuracy"] == 1.0 and rec["params"] == model.param_counts()
    # Member k is the single DAN of dim // members columns trained with seed + k and its own data order.
    for k in range(2):
        alone = run(
            tmp_path / f"alone{k}", StudentConfig(dim=4, hidden=8, members=1), cfg.model_copy(update={"seed": 13 + k})
        )
        assert alone["dev_accuracy"] == rec["members"][k]["dev_accuracy"]
        if k == 0:
            expected = load_student(alone["model_dir"], mmap=False)[0].state_dict()
            got = split_member(model, 0).state_dict()
            assert all(torch.equal(expected[n], got[n]) for n in expected)
    first, second = (split_member(model, k).embedding.weight for k in range(2))
    assert not torch.allclose(first, second)
    # Each member classifies on its own: each fitted the targets, not only their average.
    ids, offsets = to_tensors(NgramVocab.load(rec["model_dir"]), texts[:20])
    with torch.no_grad():
        each = model.member_logits(model.pool(ids, offsets)).argmax(-1).numpy()
    assert (each == np.asarray(labels[:20])[:, None]).all()

    # The merged model holds the members: their folders are gone, their records stay.
    assert not (tmp_path / "kd" / "members" / "0" / "model").exists()
    assert (tmp_path / "kd" / "members" / "0" / "member.json").exists()

    # A stage killed while training its second member resumes there, under the same settings and resume key only.
    real_train_dan = training.train_dan

    def killed(out, **kw):
        def dies_in_the_second_member(out_dir, *args, **kwargs):
            if Path(out_dir).parts[-2:] == ("members", "1"):
                raise RuntimeError("killed")
            return real_train_dan(out_dir, *args, **kwargs)

        monkeypatch.setattr(training, "train_dan", dies_in_the_second_member)
        with pytest.raises(RuntimeError, match="killed"):
            run(out, StudentConfig(dim=9, hidden=8, members=2), **kw)
        monkeypatch.setattr(training, "train_dan", real_train_dan)

    caplog.set_level(logging.INFO, logger="sparse_distill.training")
    for other in ({"train_cfg": cfg.model_copy(update={"lr": 0.04})}, {"resume_key": ""}):
        killed(tmp_path / "other")
        caplog.clear()
        run(tmp_path / "other", StudentConfig(dim=9, hidden=8, members=2), **other)
        assert "done already" not in caplog.text and "member 1 of 2: training" in caplog.text
    killed(tmp_path / "killed")
    caplog.clear()
    again = run(tmp_path / "killed", StudentConfig(dim=9, hidden=8, members=2))
    assert "member 1 of 2: done already" in caplog.text and "member 2 of 2: training" in caplog.text
    resumed = load_student(again["model_dir"])[0].state_dict()
    assert all(torch.equal(resumed[n], v) for n, v in model.state_dict().items())

    # An `init` sets up the whole student, and each member starts from its share: here the distilled student's
    # weights, trained no further (learning rates of 1e-12).
    frozen = cfg.model_copy(update={"lr": 1e-12, "table_lr": 1e-12, "max_steps": 2, "eval_every": 1})
    from_init = train_dan(
        tmp_path / "init", vocab_dir, InMemoryBatches.from_labels(texts, labels, 2), texts[:20], labels[:20],
        label_map, StudentConfig(dim=9, hidden=8, members=2), frozen, init=lambda whole: whole.load_state_dict(
            model.state_dict()
        ),
    )  # fmt: skip
    started = load_student(from_init["model_dir"])[0].state_dict()
    assert all(torch.allclose(started[n], v, atol=1e-6) for n, v in model.state_dict().items())

    # Fine-tuning a student of members starts each member from its own member: here, where dev cannot improve on
    # the start, each keeps it, so the merged fine-tuned student is the distilled one.
    ft = run(tmp_path / "kdft", StudentConfig(dim=9, hidden=8, members=2), init_model=rec["model_dir"])
    tuned = load_student(ft["model_dir"])[0]
    assert tuned.config.members == 2 and ft["dev_accuracy"] == 1.0
    assert all(torch.equal(tuned.state_dict()[n], v) for n, v in model.state_dict().items())


def test_a_student_of_members_is_not_trained_as_one_model():
    model = student_from_config(10, 2, StudentConfig(dim=4, hidden=4, members=2))
    with pytest.raises(ValueError, match="one member at a time"):
        train_student(model, None, None, [], [], TrainConfig(), lambda m: None)


def test_train_dan_from_init_model_keeps_it_unless_dev_improves(tmp_path):
    texts, labels, vocab_dir = _easy_task(tmp_path)
    label_map = LabelMap(("neg", "pos"))
    good = train_dan(
        tmp_path / "kd",
        vocab_dir,
        InMemoryBatches.from_labels(texts, labels, 2),
        texts,
        labels,
        label_map,
        StudentConfig(dim=8, hidden=8, members=1),
        TrainConfig(lr=0.05, batch_size=8, max_steps=80, patience=None),
    )
    assert good["dev_accuracy"] == 1.0
    start, _ = load_student(good["model_dir"], mmap=False)
    # Fine-tune on flipped labels with a large rate: every later evaluation is worse (or at best ties the start).
    flipped = InMemoryBatches.from_labels(texts, [1 - y for y in labels], 2)
    cfg = TrainConfig(lr=0.5, batch_size=8, max_steps=30, eval_every=5, patience=None, warmup_ratio=0)
    # Different student settings: an init model ignores them.
    rec = train_dan(
        tmp_path / "kdft",
        vocab_dir,
        flipped,
        texts,
        labels,
        label_map,
        StudentConfig(dim=4, hidden=4, members=1),
        cfg,
        init_model=good["model_dir"],
    )
    assert rec["dev_accuracy"] >= good["dev_accuracy"] and rec["best_step"] == 0 and rec["steps"] == 30
    kept, _ = load_student(rec["model_dir"], mmap=False)
    assert kept.config == start.config
    for (name, a), (_, b) in zip(start.state_dict().items(), kept.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_default_fine_tuning_undoes_what_a_wrong_teacher_taught(tmp_path):
    # A weak teacher's mistakes are in the distilled table; KD+FT's shipped rates must be able to move it (a gentle
    # 2e-4 everywhere could not: measured on a 4-class task whose teacher was below the DAN from scratch).
    texts, labels, vocab_dir = _easy_task(tmp_path)
    label_map = LabelMap(("neg", "pos"))
    student = StudentConfig(dim=8, hidden=8, members=1)
    wrong = train_dan(
        tmp_path / "kd",
        vocab_dir,
        InMemoryBatches.from_labels(texts, [1 - y for y in labels], 2),
        texts,
        [1 - y for y in labels],
        label_map,
        student,
        TrainConfig(lr=0.05, batch_size=8, max_steps=80, patience=None),
    )
    assert wrong["dev_accuracy"] == 1.0  # it learnt the flipped task
    finetune = PipelineConfig.model_fields["finetune"].default_factory()
    small = finetune.model_copy(update={"batch_size": 8, "max_steps": 60, "eval_every": 5, "patience": None})
    rec = train_dan(
        tmp_path / "kdft",
        vocab_dir,
        InMemoryBatches.from_labels(texts, labels, 2),
        texts,
        labels,
        label_map,
        student,
        small,
        init_model=wrong["model_dir"],
    )
    assert rec["dev_accuracy"] == 1.0 and rec["best_step"] > 0


def test_drop_ngrams_keeps_bags_aligned_and_never_empties_a_bag():
    from sparse_distill.training import drop_ngrams

    ids = np.arange(10, dtype=np.int64)
    offsets = np.array([0, 3, 3, 8], dtype=np.int64)  # bags [0,1,2], [], [3..7], [8,9]
    rng = np.random.default_rng(0)
    out_ids, out_offsets = drop_ngrams(ids, offsets, 0.99, rng)
    sizes = np.diff(np.append(out_offsets, len(out_ids)))
    assert list(sizes[[0, 2, 3]]) == [1, 1, 1] and sizes[1] == 0  # each non-empty bag keeps one, the empty stays empty
    assert list(out_ids) == [0, 3, 8]  # the first n-gram of each bag that lost everything
    same_ids, same_offsets = drop_ngrams(ids, offsets, 0.0, rng)
    assert np.array_equal(same_ids, ids) and np.array_equal(same_offsets, offsets)
    half_ids, half_offsets = drop_ngrams(ids, offsets, 0.5, np.random.default_rng(1))
    # Kept ids stay in their own bag, in order.
    bags = np.repeat(np.arange(4), np.diff(np.append(half_offsets, len(half_ids))))
    original_bag = np.repeat(np.arange(4), np.diff(np.append(offsets, len(ids))))
    assert np.array_equal(original_bag[half_ids], bags) and np.all(np.diff(half_ids) > 0)


# --- resumable training: checkpoints, kill -9, keys ------------------------------------------------------------------

_RESUME_CHILD = """
import json, logging, sys, time
import torch
from sparse_distill.config import PipelineConfig, StudentConfig, TrainConfig
from sparse_distill.data import LabelMap
from sparse_distill.training import InMemoryBatches, train_dan

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
out_dir, vocab_dir, texts_file = sys.argv[1:4]
texts, labels = json.load(open(texts_file))


class Slow(InMemoryBatches):
    # A pause per batch leaves the parent time to kill the run in the middle; it changes no number.
    def epoch(self, epoch, batch_size):
        for batch in super().epoch(epoch, batch_size):
            time.sleep(0.03)
            yield batch


cfg = TrainConfig(
    lr=0.01, table_lr=0.05, batch_size=6, max_steps=60, eval_every=60, patience=None, ngram_dropout=0.2,
    checkpoint_every_steps=1, checkpoint_every_minutes=None, table_optimizer="rowwise_adam",
)
data = Slow.from_labels(texts, labels, 2, seed=3)
rec = train_dan(out_dir, vocab_dir, data, texts[:20], labels[:20], LabelMap(("neg", "pos")),
                StudentConfig(dim=8, hidden=8, dropout=0.2, members=1), cfg, resume_key="stage-fp")
print(json.dumps(rec))
"""


def _child(tmp_path, out_dir):
    import json
    import subprocess
    import sys

    texts, labels, vocab_dir = _easy_task(tmp_path)
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps([texts[:40], labels[:40]]))
    script = tmp_path / "child.py"
    script.write_text(_RESUME_CHILD)
    import os
    from pathlib import Path

    import sparse_distill

    # The child imports this checkout's package, whatever the interpreter has installed.
    env = {**os.environ, "PYTHONPATH": str(Path(sparse_distill.__file__).resolve().parents[1])}
    return subprocess.Popen(
        [sys.executable, str(script), str(out_dir), str(vocab_dir), str(texts_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "student.safetensors"))


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_and_ends_with_the_uninterrupted_weights(tmp_path):
    import json
    import signal

    # The uninterrupted run.
    whole = _child(tmp_path, tmp_path / "whole")
    out, err = whole.communicate(timeout=120)
    assert whole.returncode == 0, err
    expected = json.loads(out.splitlines()[-1])

    # The same run, killed with SIGKILL once it has written the checkpoint of step 20 (it may be writing the next).
    killed = _child(tmp_path, tmp_path / "killed")
    for line in killed.stderr:
        if "checkpoint written at step 20/" in line:
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    checkpoint = tmp_path / "killed" / "checkpoint" / "train_state.pt"
    assert checkpoint.exists() and not (tmp_path / "killed" / "result.json").exists()

    resumed = _child(tmp_path, tmp_path / "killed")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    import re

    step = int(re.search(r"resuming from the checkpoint at step (\d+)/60", err).group(1))
    assert step >= 20
    got = json.loads(out.splitlines()[-1])
    assert got["steps"] == expected["steps"] == 60 and got["best_step"] == expected["best_step"]
    assert got["dev_accuracy"] == expected["dev_accuracy"]
    a, b = _weights(tmp_path / "whole" / "model"), _weights(tmp_path / "killed" / "model")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The finished stage leaves no checkpoint behind.
    assert not (tmp_path / "killed" / "checkpoint").exists()


class _Crash(Exception):
    pass


def _crash_at(step_to_crash):
    def on_metrics(step, metrics):
        if step == step_to_crash and "train_loss" in next(iter(metrics)):
            raise _Crash

    return on_metrics


def _resume_cfg(**kw):
    base = dict(
        lr=0.01, batch_size=7, max_steps=30, eval_every=10, patience=None, checkpoint_every_steps=3, ngram_dropout=0.1
    )
    return TrainConfig(**{**base, **kw})


def _run(tmp_path, out, cfg, on_metrics=None, resume_key="fp", dropout=0.1):
    texts, labels, vocab_dir = _easy_task(tmp_path)
    return train_dan(
        tmp_path / out,
        vocab_dir,
        InMemoryBatches.from_labels(texts, labels, 2),
        texts[:20],
        labels[:20],
        LabelMap(("neg", "pos")),
        StudentConfig(dim=8, hidden=8, dropout=dropout, members=1),
        cfg,
        on_metrics=on_metrics,
        resume_key=resume_key,
    )


def test_resume_after_a_crash_matches_the_uninterrupted_run_and_logs_it(tmp_path, caplog):
    caplog.set_level("INFO", logger="sparse_distill.training")
    whole = _run(tmp_path, "whole", _resume_cfg())
    assert not (tmp_path / "whole" / "checkpoint").exists()
    with pytest.raises(_Crash):
        _run(tmp_path, "crash", _resume_cfg(), on_metrics=_crash_at(20))
    assert (tmp_path / "crash" / "checkpoint" / "train_state.pt").exists()
    assert "checkpoint written at step 18/30" in caplog.text
    caplog.clear()
    again = _run(tmp_path, "crash", _resume_cfg())
    assert "resuming from the checkpoint at step 18/30" in caplog.text
    assert {k: again[k] for k in ("dev_accuracy", "best_step", "steps")} == {
        k: whole[k] for k in ("dev_accuracy", "best_step", "steps")
    }
    a, b = _weights(tmp_path / "whole" / "model"), _weights(tmp_path / "crash" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "crash" / "checkpoint").exists()


@pytest.mark.parametrize(
    "change", [{"cfg": {"lr": 0.02}}, {"resume_key": "another stage fingerprint"}, {"cfg": {"batch_size": 5}}]
)
def test_a_checkpoint_of_another_config_or_stage_is_ignored(tmp_path, caplog, change):
    caplog.set_level("INFO", logger="sparse_distill.training")
    with pytest.raises(_Crash):
        _run(tmp_path, "kd", _resume_cfg(), on_metrics=_crash_at(10))
    caplog.clear()
    rec = _run(tmp_path, "kd", _resume_cfg(**change.get("cfg", {})), resume_key=change.get("resume_key", "fp"))
    assert "made for another config or data" in caplog.text and "resuming" not in caplog.text
    assert rec["steps"] == 30 and not (tmp_path / "kd" / "checkpoint").exists()


def test_runtime_settings_do_not_change_the_checkpoint_key_or_cache_key(tmp_path, caplog):
    from sparse_distill.config import fingerprint

    base = TrainConfig()
    assert fingerprint(base) == fingerprint(TrainConfig(device="cpu", checkpoint_every_minutes=1))
    assert fingerprint(base) == fingerprint(TrainConfig(checkpoint_every_steps=7))
    # A field added at its old behaviour (SparseAdam) keeps old cache keys; another value, the default included,
    # changes them.
    old = TrainConfig(table_optimizer="sparse_adam")
    assert "table_optimizer" not in old.cache_dump() and "table_optimizer" in base.cache_dump()
    assert len({fingerprint(old), fingerprint(base), fingerprint(TrainConfig(table_optimizer="rowwise_adagrad"))}) == 3
    caplog.set_level("INFO", logger="sparse_distill.training")
    with pytest.raises(_Crash):
        _run(tmp_path, "kd", _resume_cfg(), on_metrics=_crash_at(10))
    caplog.clear()
    _run(tmp_path, "kd", _resume_cfg(checkpoint_every_steps=5, device="cpu"))
    assert "resuming from the checkpoint at step 9/30" in caplog.text


def test_no_checkpoint_settings_write_no_checkpoint(tmp_path, caplog):
    caplog.set_level("INFO", logger="sparse_distill.training")
    cfg = _resume_cfg(checkpoint_every_steps=None, checkpoint_every_minutes=None)
    with pytest.raises(_Crash):
        _run(tmp_path, "kd", cfg, on_metrics=_crash_at(10))
    assert not (tmp_path / "kd" / "checkpoint" / "train_state.pt").exists()
    assert "checkpoint written" not in caplog.text


def test_students_trained_at_once_in_one_process_start_from_their_own_seeds(tmp_path, monkeypatch):
    """The flow trains the baseline beside KD in one process; each must start from the weights its seed gives alone."""
    import threading
    import time

    import sparse_distill.training as training

    cfgs = {s: _resume_cfg(seed=s, checkpoint_every_steps=None, ngram_dropout=0.0) for s in (1, 2)}
    for s, cfg in cfgs.items():
        _run(tmp_path / f"alone{s}", "kd", cfg, dropout=0.0)
    original = training.student_from_config
    first = threading.Event()

    def slow_first_init(*args, **kwargs):
        if not first.is_set():
            first.set()
            time.sleep(0.5)  # the other stage seeds and draws meanwhile, unless seeding and drawing are one step
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "student_from_config", slow_first_init)
    # (no dropout: its masks come from torch's process-wide generator during training, which this does not cover)
    threads = [
        threading.Thread(target=_run, args=(tmp_path / f"together{s}", "kd", cfg), kwargs={"dropout": 0.0})
        for s, cfg in cfgs.items()
    ]
    threads[0].start()
    assert first.wait(10)
    threads[1].start()
    for t in threads:
        t.join()
    for s in cfgs:
        alone, together = (
            _weights(tmp_path / f"alone{s}" / "kd" / "model"),
            _weights(tmp_path / f"together{s}" / "kd" / "model"),
        )
        assert all(torch.equal(alone[k], together[k]) for k in alone), f"seed {s}"


# --- devices ----------------------------------------------------------------------------------------------------------


def test_resolve_device_cpu_auto_and_a_missing_gpu():
    from pydantic import ValidationError

    from sparse_distill.training import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        for spec in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match=r"distill\.device.*no CUDA GPU"):
                resolve_device(spec)
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ValidationError):
            TrainConfig(device=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a GPU request on a machine without one")
def test_training_on_cuda_without_a_gpu_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"distill\.device"):
        _run(tmp_path, "kd", _resume_cfg(device="cuda"))
    assert not (tmp_path / "kd" / "model").exists()


def test_explicit_cpu_device_trains_the_same_student_as_auto_on_a_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("auto is the GPU here")
    a = _run(tmp_path, "auto", _resume_cfg(device="auto", checkpoint_every_steps=None))
    b = _run(tmp_path, "cpu", _resume_cfg(device="cpu", checkpoint_every_steps=None))
    assert a["dev_accuracy"] == b["dev_accuracy"]
    wa, wb = _weights(tmp_path / "auto" / "model"), _weights(tmp_path / "cpu" / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    model, _ = load_student(tmp_path / "cpu" / "model", mmap=False)
    assert model.embedding.weight.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("optimizer", ["rowwise_adam", "sparse_adam", "rowwise_adagrad"])
def test_a_gpu_student_learns_resumes_where_it_stopped_and_loads_on_a_cpu(tmp_path, caplog, optimizer):
    caplog.set_level("INFO", logger="sparse_distill.training")
    on_gpu = _resume_cfg(device="cuda", table_optimizer=optimizer)
    whole = _run(tmp_path, "whole", on_gpu)
    # the easy task learnt (chance is 0.5; on a CPU every optimizer reaches 1.0 in these 30 steps, and on an H200 the
    # slowest, row-wise Adagrad, 0.85: other dropout masks, bf16 dense layers)
    assert whole["dev_accuracy"] >= 0.8
    with pytest.raises(_Crash):
        _run(tmp_path, "crash", on_gpu, on_metrics=_crash_at(20))
    caplog.clear()
    again = _run(tmp_path, "crash", on_gpu)
    assert "resuming from the checkpoint at step 18/30" in caplog.text
    assert again["steps"] == whole["steps"]
    # the GPU's scatter-adds are not bit-deterministic, so close rather than equal
    a, b = _weights(tmp_path / "whole" / "model"), _weights(tmp_path / "crash" / "model")
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)
    model, _ = load_student(tmp_path / "whole" / "model", mmap=False)
    assert model.embedding.weight.device.type == "cpu"


def test_pool_and_head_compose_to_forward():
    torch.manual_seed(0)
    for pooling in ("mean", "max", "sum"):
        model = student_from_config(30, 3, StudentConfig(dim=4, hidden=5, pooling=pooling, members=1)).eval()
        ids, offsets = torch.tensor([1, 2, 2, 9, 4]), torch.tensor([0, 3, 3])
        assert torch.equal(model(ids, offsets), model.head(model.pool(ids, offsets)))


def test_prefetched_keeps_order_raises_errors_and_stops_its_thread():
    import threading

    from sparse_distill.training import prefetched

    assert list(prefetched(iter(range(20)), lambda x: x * x, depth=2)) == [x * x for x in range(20)]

    def fail_at_5(x: int) -> int:
        if x == 5:
            raise ValueError("bad batch 5")
        return x

    got = []
    with pytest.raises(ValueError, match="bad batch 5"):
        for item in prefetched(iter(range(10)), fail_at_5):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]
    # A consumer that stops early: closing the generator ends the thread, which was blocked on a full queue.
    stream = prefetched(iter(range(1_000)), lambda x: x, depth=2)
    assert next(stream) == 0
    stream.close()
    assert not any(t.name == "sparse-distill-prefetch" for t in threading.enumerate())


def test_removing_a_checkpoint_sweeps_the_temporary_of_a_writer_killed_mid_write(tmp_path):
    import os
    import subprocess

    from sparse_distill.data import TMP_SUFFIX, owner_tag
    from sparse_distill.training import Checkpointing

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "train_state.pt").write_bytes(b"state")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a writer that is gone, as after SIGKILL
    (folder / f".train_state.pt.{owner_tag().replace(str(os.getpid()), str(dead.pid))}x{TMP_SUFFIX}").write_bytes(b"")
    Checkpointing(folder, "key", dict, lambda _: None).remove()
    assert not folder.exists()
