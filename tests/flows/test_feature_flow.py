"""The featurising flow: shards fanned out over two workers equal the one-thread stage; a poison shard fails alone,
named, and a re-run featurises only it; the pipeline fans featurising out when labelling has several workers."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from sparse_distill import features
from sparse_distill.soft_labels import SHARDS
from sparse_distill.testing import make_labelled_shards
from sparse_distill.vocab import build_vocab

pytestmark = pytest.mark.usefixtures("prefect_harness")

TEXTS = [f"review {i} of the film was {'great fun' if i % 3 else 'dull and slow'}" for i in range(40)]


def _inputs(tmp_path):
    labels = [str(make_labelled_shards(tmp_path / n, TEXTS[: 40 - k], 7, seed=k)) for k, n in enumerate(["a", "b"])]
    build_vocab(TEXTS, 30, 2).save(tmp_path / "vocab")
    return labels, str(tmp_path / "vocab"), [str(tmp_path / "features" / n) for n in ("a", "b")]


def _flow(*args, workers: int = 2):
    from flows.feature_flow import featurize_labels_flow
    from flows.runners import make_task_runner
    from sparse_distill.config import LabelConfig

    runner = make_task_runner(LabelConfig(runner="thread", workers=workers))
    return featurize_labels_flow.with_options(task_runner=runner)(*args, retries=0, return_state=True)


@pytest.mark.slow
def test_two_workers_equal_the_one_thread_stage_and_a_rerun_does_nothing(tmp_path):
    labels, vocab, outs = _inputs(tmp_path)
    state = _flow(labels, vocab, outs)
    assert state.is_completed() and state.result() == {"shards": 6 + 6, "docs": 40 + 39}
    for label_dir, out in zip(labels, outs, strict=True):
        reference = features.featurize_labels(label_dir, vocab, tmp_path / "one" / out[-1])
        names = sorted(p.name for p in (reference / SHARDS).glob("*.parquet"))
        assert names == sorted(p.name for p in (tmp_path / "features" / out[-1] / SHARDS).glob("*.parquet"))
        for name in names:
            assert pq.read_table(reference / SHARDS / name).equals(pq.read_table(f"{out}/{SHARDS}/{name}"))
    assert _flow(labels, vocab, outs).result() == {"shards": 0, "docs": 0}


@pytest.mark.slow
def test_poison_shard_fails_alone_and_a_rerun_featurises_only_it(tmp_path, monkeypatch):
    from flows.feature_flow import FeaturizingFailed

    labels, vocab, outs = _inputs(tmp_path)
    real = features.featurize_shard

    def poisoned(label_dir, vocab_obj, vsum, out_dir, index):
        if out_dir == outs[1] and index == 3:
            raise OSError("disk gone")
        return real(label_dir, vocab_obj, vsum, out_dir, index)

    monkeypatch.setattr(features, "featurize_shard", poisoned)
    state = _flow(labels, vocab, outs)
    assert state.is_failed()
    with pytest.raises(FeaturizingFailed, match=r"1 of 12 shards failed \(.*b shard 00003: OSError: disk gone\)"):
        state.result()
    assert features.pending_feature_shards(labels[0], vocab, outs[0]) == []
    assert features.pending_feature_shards(labels[1], vocab, outs[1]) == [3]
    monkeypatch.setattr(features, "featurize_shard", real)
    assert _flow(labels, vocab, outs).result() == {"shards": 1, "docs": 7}
    assert features.pending_feature_shards(labels[1], vocab, outs[1]) == []
