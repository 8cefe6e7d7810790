"""Save then load gives identical predictions; pooling modes; the predictor on raw text."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from sparse_distill.config import StudentConfig
from sparse_distill.data import LabelMap
from sparse_distill.inference import StudentPredictor
from sparse_distill.student import Int8EmbeddingBag, load_student, quantize_student, save_student
from sparse_distill.training import make_optimizers, student_from_config
from sparse_distill.vocab import build_vocab

TEXTS = ["a great and moving film", "dull, tedious and long", "", "unknownword only", "great great great"]


@pytest.mark.parametrize("pooling", ["mean", "max", "sum"])
def test_save_load_identical_predictions(tmp_path, pooling):
    vocab = build_vocab(TEXTS, 50, 3)
    vocab.save(tmp_path / "vocab")
    torch.manual_seed(0)
    model = student_from_config(len(vocab), 3, StudentConfig(dim=8, hidden=6, pooling=pooling))
    label_map = LabelMap.from_values(["neg", "neutral", "pos"])
    before = StudentPredictor(model, vocab, label_map).predict_proba(TEXTS)
    save_student(model, label_map, tmp_path / "vocab", tmp_path / "model")
    loaded = StudentPredictor.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict_proba(TEXTS), before)
    assert loaded.labels == ["neg", "neutral", "pos"]
    assert set(loaded.predict(TEXTS)) <= {"neg", "neutral", "pos"}
    assert np.allclose(before.sum(1), 1.0)


def test_overwrite_is_atomic_and_load_errors(tmp_path):
    vocab = build_vocab(TEXTS, 50, 2)
    vocab.save(tmp_path / "v")
    model = student_from_config(len(vocab), 2, StudentConfig(dim=4, hidden=4))
    lm = LabelMap.from_values([0, 1])
    save_student(model, lm, tmp_path / "v", tmp_path / "m")
    save_student(model, lm, tmp_path / "v", tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "v"]
    with pytest.raises(FileNotFoundError, match="not a student model folder"):
        load_student(tmp_path / "v")


@pytest.mark.parametrize("table_dtype", ["float16", "int8"])
def test_quantized_tables_predict_close_to_float32_and_are_smaller(tmp_path, table_dtype):
    docs = [f"w{i % 37} w{(i * 7) % 41} good film w{i % 5}" for i in range(200)] + TEXTS
    vocab = build_vocab(docs, 400, 2)
    vocab.save(tmp_path / "vocab")
    torch.manual_seed(0)
    model = student_from_config(len(vocab), 2, StudentConfig(dim=64, hidden=16))
    save_student(model, LabelMap.from_values(["neg", "pos"]), tmp_path / "vocab", tmp_path / "fp32")
    quantize_student(tmp_path / "fp32", tmp_path / "q", table_dtype)
    full, small = StudentPredictor.load(tmp_path / "fp32"), StudentPredictor.load(tmp_path / "q")
    assert small.model.config.table_dtype == table_dtype
    tolerance = 2e-3 if table_dtype == "float16" else 2e-2
    np.testing.assert_allclose(small.predict_proba(docs), full.predict_proba(docs), atol=tolerance)
    np.testing.assert_allclose(small.predict_one(docs[3]), full.predict_proba(docs[3:4])[0], atol=tolerance)
    ratio = {"float16": 0.5, "int8": 0.25 + 8 / 64}[table_dtype]
    table_bytes = (tmp_path / "q/student.safetensors").stat().st_size
    assert table_bytes < (tmp_path / "fp32/student.safetensors").stat().st_size * (ratio + 0.05)
    with pytest.raises(ValueError, match="already"):
        quantize_student(tmp_path / "q", tmp_path / "again", "int8")
    with pytest.raises(ValueError, match="inference only"):
        make_optimizers(small.model, 1e-3)


def test_int8_rows_round_trip_within_their_step_and_empty_bags_stay_zero():
    torch.manual_seed(0)
    weight = torch.randn(50, 16)
    table = Int8EmbeddingBag.from_float(weight)
    step = (weight.max(1).values - weight.min(1).values) / 255
    assert torch.all((table.dequantize() - weight).abs() <= step[:, None] / 2 + 1e-6)
    pooled = table(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 2]))
    assert torch.all(pooled[0] == 0)
    torch.testing.assert_close(pooled[1], table.dequantize()[[1, 2]].mean(0))
    with pytest.raises(ValueError, match="max"):
        Int8EmbeddingBag.from_float(weight, mode="max")


def test_max_pooling_student_cannot_be_int8(tmp_path):
    vocab = build_vocab(TEXTS, 50, 2)
    vocab.save(tmp_path / "v")
    model = student_from_config(len(vocab), 2, StudentConfig(dim=4, hidden=4, pooling="max"))
    save_student(model, LabelMap.from_values([0, 1]), tmp_path / "v", tmp_path / "m")
    with pytest.raises(ValueError, match="max"):
        quantize_student(tmp_path / "m", tmp_path / "q", "int8")
    quantize_student(tmp_path / "m", tmp_path / "h", "float16")
    np.testing.assert_allclose(
        StudentPredictor.load(tmp_path / "h").predict_proba(TEXTS),
        StudentPredictor.load(tmp_path / "m").predict_proba(TEXTS),
        atol=2e-3,
    )


def test_threads_give_the_same_predictions_and_bad_settings_are_refused(tmp_path):
    docs = [f"w{i % 37} w{(i * 7) % 41} good film" for i in range(300)]
    vocab = build_vocab(docs, 300, 3)
    model = student_from_config(len(vocab), 2, StudentConfig(dim=8, hidden=4))
    lm = LabelMap.from_values([0, 1])
    one = StudentPredictor(model, vocab, lm).predict_proba(docs, batch_size=7)
    threads = torch.get_num_threads()
    try:
        many = StudentPredictor(model, vocab, lm, threads=3)
        np.testing.assert_array_equal(many.predict_proba(docs, batch_size=7), one)
        many.close()
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="threads"):
        StudentPredictor(model, vocab, lm, threads=0)
    with pytest.raises(ValueError, match="batch_size"):
        StudentPredictor(model, vocab, lm).predict_proba(docs, batch_size=0)


def test_extra_dense_layers_save_load_and_one_layer_keeps_its_keys(tmp_path):
    vocab = build_vocab(TEXTS, 50, 3)
    vocab.save(tmp_path / "vocab")
    one = student_from_config(len(vocab), 2, StudentConfig(dim=8, hidden=6, members=1))
    assert not any(k.startswith("extra.") for k in one.state_dict())
    torch.manual_seed(0)
    three = student_from_config(len(vocab), 2, StudentConfig(dim=8, hidden=6, layers=3, members=1))
    assert three.param_counts()["dense"] == one.param_counts()["dense"] + 2 * (6 * 6 + 6)
    label_map = LabelMap.from_values(["neg", "pos"])
    before = StudentPredictor(three, vocab, label_map).predict_proba(TEXTS)
    save_student(three, label_map, tmp_path / "vocab", tmp_path / "model")
    loaded = StudentPredictor.load(tmp_path / "model")
    assert loaded.model.config.layers == 3
    np.testing.assert_array_equal(loaded.predict_proba(TEXTS), before)


def test_members_are_independent_dans_on_their_own_columns_averaged_in_probability(tmp_path):
    vocab = build_vocab(TEXTS, 50, 3)
    vocab.save(tmp_path / "vocab")
    torch.manual_seed(0)
    model = student_from_config(len(vocab), 3, StudentConfig(dim=8, hidden=6, members=2)).eval()
    ids, offsets = torch.tensor([1, 2, 3, 4, 2]), torch.tensor([0, 3])
    with torch.no_grad():
        pooled = model.pool(ids, offsets)
        members = model.member_logits(pooled)
        # Member 1 by hand: columns 4-7 of the pooled vector through its own two layers.
        by_hand = torch.relu(pooled[:, 4:] @ model.fc1.weight[1].T + model.fc1.bias[1]) @ model.fc2.weight[1].T
        np.testing.assert_allclose(members[:, 1], by_hand + model.fc2.bias[1], rtol=1e-5, atol=1e-6)
        # The student predicts the mean of its members' probabilities.
        np.testing.assert_allclose(
            torch.softmax(model(ids, offsets), -1), torch.softmax(members, -1).mean(1), rtol=1e-5, atol=1e-6
        )
    # One member keeps the plain layers (and the keys of students saved before members); members save and load.
    one = student_from_config(len(vocab), 3, StudentConfig(dim=8, hidden=6, members=1))
    assert one.state_dict()["fc1.weight"].shape == (6, 8)
    assert model.state_dict()["fc1.weight"].shape == (2, 6, 4)
    assert model.param_counts()["dense"] == 2 * (4 * 6 + 6 + 6 * 3 + 3)
    label_map = LabelMap.from_values(["neg", "neutral", "pos"])
    before = StudentPredictor(model, vocab, label_map).predict_proba(TEXTS)
    save_student(model, label_map, tmp_path / "vocab", tmp_path / "model")
    np.testing.assert_array_equal(StudentPredictor.load(tmp_path / "model").predict_proba(TEXTS), before)
    # Never more members than columns.
    assert StudentConfig(dim=2, members=3).member_count == 2
    assert student_from_config(len(vocab), 3, StudentConfig(dim=2, members=3)).config.members == 2


def test_table_initialised_from_wider_vectors_keeps_their_leading_structure():
    from sparse_distill.student import init_table_from_vectors

    rng = np.random.default_rng(0)
    # 200 rows in 32 dims whose variance lies mostly in 4 directions: PCA to d = 4 keeps them.
    basis = rng.normal(size=(4, 32))
    vectors = rng.normal(size=(200, 4)) * [5, 4, 3, 2] @ basis + 0.01 * rng.normal(size=(200, 32))
    model = student_from_config(200, 2, StudentConfig(dim=4, hidden=6, init_std=0.1, members=1))
    init_table_from_vectors(model, vectors.astype(np.float32))
    table = model.embedding.weight.detach().numpy()
    np.testing.assert_allclose(table.std(0, ddof=1), 0.1, rtol=1e-3)
    # The table spans the vectors' leading directions: it predicts them almost perfectly by least squares.
    orig = vectors - vectors.mean(0)
    coef, *_ = np.linalg.lstsq(table, orig, rcond=None)
    explained = 1 - ((orig - table @ coef) ** 2).sum() / (orig**2).sum()
    assert explained > 0.99
    with pytest.raises(ValueError, match="vectors for a table"):
        init_table_from_vectors(student_from_config(100, 2, StudentConfig(dim=4, members=1)), vectors)
    # Fewer vectors than rows (subword buckets after the n-grams): the first rows are set, the rest keep their init.
    wider = student_from_config(250, 2, StudentConfig(dim=4, hidden=6, init_std=0.1, members=1))
    tail = wider.embedding.weight.detach()[200:].clone()
    torch.manual_seed(123)  # whatever the global random state, the same vectors give the same table
    init_table_from_vectors(wider, vectors.astype(np.float32))
    np.testing.assert_allclose(wider.embedding.weight.detach()[:200].numpy(), table, rtol=1e-5, atol=1e-6)
    assert torch.equal(wider.embedding.weight.detach()[200:], tail)
    with pytest.raises(ValueError, match="fewer than"):
        init_table_from_vectors(student_from_config(200, 2, StudentConfig(dim=64, members=1)), vectors)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_compiled_table_gradient_equals_embedding_bags(pooling):
    torch.manual_seed(0)
    model = student_from_config(50, 3, StudentConfig(dim=5, hidden=4, pooling=pooling))
    # Repeats within and across bags, and empty bags at the start, middle and end.
    ids = torch.tensor([7, 3, 3, 49, 7, 0, 3, 12, 12, 12])
    offsets = torch.tensor([0, 0, 4, 4, 9, 10])
    grads = {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        model.fused_table_grad = fused
        model(ids, offsets).pow(2).sum().backward()
        grads[fused] = model.embedding.weight.grad
    fused_grad, reference = grads[True], grads[False]
    assert fused_grad.is_sparse
    # One row per distinct n-gram, ascending: not one per occurrence.
    assert fused_grad._indices()[0].tolist() == sorted(set(ids.tolist()))
    torch.testing.assert_close(fused_grad.to_dense(), reference.to_dense(), atol=1e-6, rtol=1e-5)
    assert (model._position == -1).all()


def test_compiled_table_gradient_trains_with_every_table_optimizer():
    # Three steps of each optimizer from the same start: the kernel's gradient moves the table as EmbeddingBag's does.
    ids, offsets = torch.tensor([1, 2, 2, 5, 9, 1]), torch.tensor([0, 3])
    for name in ("sparse_adam", "rowwise_adam", "rowwise_adagrad"):
        tables = []
        for fused in (True, False):
            torch.manual_seed(0)
            model = student_from_config(12, 2, StudentConfig(dim=4, hidden=3))
            model.fused_table_grad = fused
            optimizers = make_optimizers(model, 1e-2, 1e-1, name)
            for _ in range(3):
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                model(ids, offsets).logsumexp(1).sum().backward()
                for opt in optimizers:
                    opt.step()
            tables.append(model.embedding.weight.detach().clone())
        torch.testing.assert_close(tables[0], tables[1], atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_table_gradient_and_update_do_not_depend_on_the_thread_count():
    # The kernels split columns (backward) or rows (update) between threads; each float is still summed in one order.
    import numba

    from sparse_distill.table_kernels import bag_backward, bag_gradient, rowwise_adam_bag, rowwise_adam_rows

    rng = np.random.default_rng(0)
    ids = (rng.random(4_000) ** 3 * 3_000).astype(np.int64)
    offsets = np.arange(0, 4_000, 40, dtype=np.int64)
    grad_pooled = rng.standard_normal((len(offsets), 33)).astype(np.float32)
    position = np.full(3_000, -1, np.int64)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            rows, summed = bag_backward(ids, offsets, grad_pooled, True, position)
            table, m, v = (
                np.ones((3_000, 33), np.float32),
                np.zeros((3_000, 33), np.float32),
                np.zeros(3_000, np.float32),
            )
            rowwise_adam_rows(table, m, v, rows, summed, 0.01, 0.9, 0.999, 1e-8, 0.1, 0.001)
            # The update fused into the backward: its chunks of rows go to the threads, each row summed in one order.
            grad = bag_gradient(ids, offsets, grad_pooled, True, position)
            fused = np.ones((3_000, 33), np.float32)
            m[:], v[:] = 0, 0
            args = (grad.rows, grad.starts, grad.docs, grad.grad, 0.01, 0.9, 0.999, 1e-8, 0.1, 0.001)
            rowwise_adam_bag(fused, m, v, *args)
            results.append((rows, summed, table, fused))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(results[0], results[-1], strict=True):
        assert np.array_equal(a, b)
    assert (position == -1).all() and len(results[0][0]) == len(np.unique(ids))
    assert np.array_equal(results[0][2], results[0][3])  # fused or not, the same table


@pytest.mark.parametrize("table_rows", [40, 100_000], ids=["scan", "sort"])
def test_compiled_table_gradient_numbers_rows_in_order_by_scan_or_by_sort(table_rows):
    # A table at most 64 times the batch's occurrences is scanned for the marked rows; a larger one sorts them.
    from sparse_distill.table_kernels import bag_backward

    ids = np.array([31, 4, 4, 17, 0, 31, 9, 39], np.int64)
    offsets = np.array([0, 3, 3, 6], np.int64)
    grad_pooled = np.arange(8, dtype=np.float32).reshape(4, 2)
    position = np.full(table_rows, -1, np.int64)
    rows, summed = bag_backward(ids, offsets, grad_pooled, False, position)
    expected = np.zeros((table_rows, 2), np.float32)
    for doc, (start, stop) in enumerate(zip(offsets, [*offsets[1:], len(ids)], strict=True)):
        for k in range(start, stop):
            expected[ids[k]] += grad_pooled[doc]
    assert rows.tolist() == sorted(set(ids.tolist()))
    assert np.array_equal(summed, expected[rows]) and (position == -1).all()


@pytest.mark.parametrize("name", ["rowwise_adam", "rowwise_adagrad"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_table_updated_in_backward_gives_the_weights_of_a_summed_gradient_and_step(name, pooling):
    # Three steps, the update fused into the backward or the gradient summed and stepped: the very same floats.
    rng = np.random.default_rng(0)
    batches = [
        (torch.from_numpy((rng.random(300) ** 2 * 60).astype(np.int64)), torch.tensor([0, 0, 90, 200, 200]))
        for _ in range(3)
    ]
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = student_from_config(60, 3, StudentConfig(dim=7, hidden=5, pooling=pooling))
        optimizers = make_optimizers(model, 1e-2, 1e-1, name)
        with model.table_updated_in_backward(optimizers[0]) if fused else contextlib.nullcontext(False) as applies:
            assert applies == fused
            for ids, offsets in batches:
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                model(ids, offsets).logsumexp(1).sum().backward()
                # Fused, the table has moved already and holds no gradient.
                assert (model.embedding.weight.grad is None) == fused
                for opt in optimizers:
                    opt.step()
        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizers[0].state_dict()["state"][0].items()}
        results.append((model.state_dict(), state))
    (fused_weights, fused_state), (weights, state) = results
    for key in weights:
        assert torch.equal(fused_weights[key], weights[key]), key
    for key in state:
        assert (
            torch.equal(fused_state[key], state[key]) if torch.is_tensor(state[key]) else fused_state[key] == state[key]
        )


def test_table_is_updated_in_backward_only_inside_the_context_and_only_by_row_wise_optimizers():
    ids, offsets = torch.tensor([1, 2, 2, 5]), torch.tensor([0, 2])
    model = student_from_config(12, 2, StudentConfig(dim=4, hidden=3))
    table, dense = make_optimizers(model, 1e-2, 1e-1, "rowwise_adam")
    with model.table_updated_in_backward(table):
        pass
    before = model.embedding.weight.detach().clone()
    # After the context (an explanation's backward, say): a gradient, and the table unmoved.
    model(ids, offsets).sum().backward()
    assert model.embedding.weight.grad is not None and torch.equal(model.embedding.weight.detach(), before)
    # SparseAdam has no fused update; max pooling takes no compiled backward: both keep the gradient and step().
    sparse_adam, _ = make_optimizers(model, 1e-2, 1e-1, "sparse_adam")
    with model.table_updated_in_backward(sparse_adam) as applies:
        assert not applies
    max_model = student_from_config(12, 2, StudentConfig(dim=4, hidden=3, pooling="max"))
    with max_model.table_updated_in_backward(make_optimizers(max_model, 1e-2, 1e-1, "rowwise_adam")[0]) as applies:
        assert not applies
    with pytest.raises(ValueError, match="one table"):
        torch.optim.Optimizer.add_param_group(table, {"params": [torch.zeros(3, 4)]})
        table.update_from_bag(None)


def test_a_plan_made_ahead_gives_the_same_table_gradient(monkeypatch):
    # Training's prefetch thread groups a batch's occurrences by row ahead of the step (`bag_plan`, its own position
    # array); the backward then skips that work and must give the same gradient.
    from sparse_distill import table_kernels

    ids, offsets = torch.tensor([7, 3, 3, 49, 7, 0, 3, 12, 12, 12]), torch.tensor([0, 0, 4, 4, 9, 10])
    grads = []
    for planned in (False, True):
        torch.manual_seed(0)
        model = student_from_config(50, 3, StudentConfig(dim=5, hidden=4, pooling="mean"))
        plan = None
        if planned:
            plan = table_kernels.bag_plan(ids.numpy(), offsets.numpy(), np.full(50, -1, np.int64))
            monkeypatch.setattr(table_kernels, "bag_plan", lambda *a: pytest.fail("the backward made the plan again"))
        model.pool(ids, offsets, plan).pow(2).sum().backward()
        grads.append(model.embedding.weight.grad)
    assert torch.equal(grads[0].to_dense(), grads[1].to_dense())
    assert grads[1]._indices()[0].tolist() == sorted(set(ids.tolist()))
