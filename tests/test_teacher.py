"""The teacher's train sample."""

from __future__ import annotations

from sparse_distill.teacher import sample_rows


def test_a_train_sample_of_a_label_sorted_file_holds_every_label_and_is_seeded():
    labels = ["neg"] * 500 + ["pos"] * 500  # IMDB's train file is sorted like this
    rows = sample_rows(len(labels), 100, seed=13)
    assert len(rows) == len(set(rows)) == 100 and rows == sorted(rows)
    assert 30 < sum(labels[i] == "pos" for i in rows) < 70
    assert rows == sample_rows(len(labels), 100, seed=13) != sample_rows(len(labels), 100, seed=14)
    assert sample_rows(10, 50, seed=1) == list(range(10))
