"""End to end with no corpus: the stages make a transfer set from the train texts, the teacher labels it, a probe
student picks a second round of texts, the teacher labels those too, and distillation trains on train + both rounds;
a second run is served from cache."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from sparse_distill.config import PipelineConfig
from sparse_distill.soft_labels import iter_soft_labels, read_manifest
from sparse_distill.vocab import NgramVocab

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

TRAIN_ROWS = 300  # conftest's tiny train split
DISTILL_BATCH = 50


def _no_corpus_config(raw: dict, **transfer) -> PipelineConfig:
    raw = {**raw, "data": {**raw["data"], "corpus": []}}
    raw["teacher"] = {**raw["teacher"], "skip_finetune": True}  # the random tiny teacher labels as it is: faster
    raw["transfer"] = {"copies_per_text": 1, "min_documents": 0, **transfer}  # auto: one text per train row
    # One pass over the distillation data: the step budget tells how many documents it had.
    raw["distill"] = {"lr": 1e-2, "batch_size": DISTILL_BATCH, "epochs": 1, "eval_every": 4, "shuffle_buffer": 200}
    raw["finetune"] = {"lr": 1e-3, "batch_size": 64, "max_steps": 3, "eval_every": 3}
    raw["scratch"] = {"lr": 1e-2, "batch_size": 64, "max_steps": 4, "eval_every": 4}
    return PipelineConfig.model_validate(raw)


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory, tiny_data, tiny_teacher, make_tiny_pipeline, prefect_harness):
    """One run of the training stages with no corpus, then the same again."""
    from flows.pipeline_flow import base_stages_flow

    d = tmp_path_factory.mktemp("transfer-run")
    config = _no_corpus_config(make_tiny_pipeline(tiny_data, tiny_teacher, f"sqlite:///{d / 'mlflow.db'}", "tiny-tr"))
    run_dir = d / "run"
    first = base_stages_flow(config=config, run_dir=str(run_dir), return_state=True)
    transfer_file = run_dir / "transfer" / "transfer.parquet"
    mtime = transfer_file.stat().st_mtime_ns if transfer_file.exists() else None
    second = base_stages_flow(config=config, run_dir=str(run_dir), return_state=True)
    return config, run_dir, first, second, mtime


def test_no_corpus_makes_a_labelled_transfer_set_that_distillation_uses(transfer_run):
    from sparse_distill.teacher import teacher_word_vectors

    config, run_dir, first, _, _ = transfer_run
    assert first.is_completed()
    result = first.result()
    # One text per train row (copies_per_text 1), then the teacher's whole words, one per text.
    words = teacher_word_vectors(config.teacher.model)[0]
    rows = TRAIN_ROWS + len(words)
    transfer = pq.read_table(run_dir / "transfer" / "transfer.parquet")
    assert transfer.column_names == ["id", "text", "source_rows", "source_shares"] and transfer.num_rows == rows
    assert transfer.column("text").to_pylist()[TRAIN_ROWS:] == words
    # Each made text names its train rows (whose gold labels distillation mixes in); the teacher's words name none.
    sources = transfer.column("source_rows").to_pylist()
    assert all(1 <= len(r) <= 2 for r in sources[:TRAIN_ROWS]) and not any(sources[TRAIN_ROWS:])
    # Every transfer text has the teacher's soft labels (a distribution over the two classes).
    label_dir = run_dir / "labels" / "transfer"
    assert read_manifest(label_dir).total_rows == rows
    labelled, probs = [], []
    for texts, p in iter_soft_labels(label_dir):
        labelled.extend(texts)
        probs.append(p)
    probs = np.concatenate(probs)
    assert sorted(labelled) == sorted(transfer.column("text").to_pylist())
    assert probs.shape == (rows, 2) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    # The vocabulary has a row for every word of the transfer set (the counted n-grams first).
    vocab = NgramVocab.load(run_dir / "vocab")
    assert set(words) <= set(vocab.ngrams)
    # The train split's labels too (no corpus), and distillation read all three: one pass over train + transfer + the
    # second round (auto: as many texts as the transfer set generated, picked from hard_pool times as many).
    assert read_manifest(run_dir / "labels" / "train").total_rows == TRAIN_ROWS
    assert read_manifest(run_dir / "labels" / "transfer_hard").total_rows == TRAIN_ROWS
    kd = result["students"]["kd"]
    assert kd["budget"]["reason"] == "epochs set"
    assert kd["budget"]["steps"] == math.ceil((TRAIN_ROWS + rows + TRAIN_ROWS) / DISTILL_BATCH)
    assert sorted(p.name for p in (run_dir / "students" / "kd" / "features").iterdir()) == [
        "train",
        "transfer",
        "transfer_hard",
    ]
    assert Path(kd["model_dir"]).is_dir() and 0 <= kd["dev_accuracy"] <= 1


def test_the_second_round_keeps_the_candidates_its_probe_is_least_sure_of(transfer_run):
    from sparse_distill.inference import StudentPredictor
    from sparse_distill.pipeline import class_margins, run_choices
    from sparse_distill.run_store import read_stage

    config, run_dir, *_ = transfer_run
    record = read_stage(run_dir, "transfer_hard")
    # hard_share 0.5: half the round for the probe's doubt, from hard_pool candidates each; half at random.
    doubted = TRAIN_ROWS // 2
    assert record["rows"] == TRAIN_ROWS and record["least_sure"] == doubted
    assert record["candidates"] == TRAIN_ROWS - doubted + doubted * config.transfer.hard_pool
    assert "least sure of" in record["reason"] and "150 at random" in record["reason"]
    hard = pq.read_table(record["path"]).to_pydict()
    assert hard["id"] == [f"hard:{i}" for i in range(doubted)] + [f"random:{i}" for i in range(TRAIN_ROWS - doubted)]
    # The probe is a student distilled on the first round: train + transfer, one pass.
    probe = StudentPredictor.load(run_dir / "transfer_hard" / "probe" / "model")
    kept = class_margins(probe.predict_proba(hard["text"][:doubted]))
    at_random = class_margins(probe.predict_proba(hard["text"][doubted:]))
    assert float(kept.max()) == pytest.approx(record["max_margin"], abs=1e-5)
    assert f"margin at most {record['max_margin']:.3f}" in record["reason"]
    # Kept from eight candidates each: the probe is less sure of them than of the random half, and of the first
    # round's texts.
    first = pq.read_table(run_dir / "transfer" / "transfer.parquet").column("text").to_pylist()[:TRAIN_ROWS]
    assert np.median(kept) < np.median(at_random)
    assert np.median(kept) < np.median(class_margins(probe.predict_proba(first)))
    # The run's summary says what the second round was.
    assert run_choices(config, run_dir)["transfer_hard"] == f"{TRAIN_ROWS:,} texts: {record['reason']}"


def test_a_second_run_is_served_from_cache(transfer_run, task_states):
    _, run_dir, first, second, mtime = transfer_run
    assert second.is_completed()
    states = task_states(second.state_details.flow_run_id)
    assert any(name.startswith("transfer") for name in task_states(first.state_details.flow_run_id))
    assert states and all(s == "Cached" for s in states.values()), states
    assert (run_dir / "transfer" / "transfer.parquet").stat().st_mtime_ns == mtime  # not made again


def test_distill_flow_ignores_a_transfer_set_the_config_turned_off(transfer_run, tmp_path):
    from flows.pipeline_flow import distill_flow

    config, run_dir, *_ = transfer_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)  # the module's run dir stays as it was
    off = config.model_copy(update={"transfer": config.transfer.model_copy(update={"size": 0})})
    kd = distill_flow(config=off, run_dir=str(copy))
    assert kd["budget"]["steps"] == math.ceil(TRAIN_ROWS / DISTILL_BATCH)  # the train split's labels only


def test_distill_flow_featurises_on_the_labelling_runner_when_it_has_workers(transfer_run, tmp_path, monkeypatch):
    import sparse_distill.pipeline as pipeline
    from flows.pipeline_flow import distill_flow
    from sparse_distill.features import pending_feature_shards

    config, run_dir, *_ = transfer_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "students" / "kd")
    real = pipeline.featurize_labels

    def only_checks(label_dir, vocab_dir, out_dir):
        # The stage itself finds every shard done by the featurising flow.
        assert pending_feature_shards(label_dir, vocab_dir, out_dir) == []
        return real(label_dir, vocab_dir, out_dir)

    monkeypatch.setattr(pipeline, "featurize_labels", only_checks)
    fanned = config.model_copy(update={"label": config.label.model_copy(update={"workers": 2})})
    kd = distill_flow(config=fanned, run_dir=str(copy))
    assert sorted(p.name for p in (copy / "students" / "kd" / "features").iterdir()) == [
        "train",
        "transfer",
        "transfer_hard",
    ]
    # The same ids as the first run's stage featurised inline. Compared on ids, not on dev accuracy: since the subword
    # buckets came in, two trainings on the same ids in one process have given different 40-text dev scores (0.525
    # and 0.45), a non-determinism still to be found (issue 16's note).
    from sparse_distill.features import iter_featurized

    # The second round is made again in the copy (its record names the first folder's files), by a probe trained
    # again, so only the first round's ids are compared.
    for name in ("train", "transfer"):
        labels = copy / "labels" / name
        fanned_ids = list(iter_featurized(labels, copy / "students" / "kd" / "features" / name))
        inline_ids = list(iter_featurized(run_dir / "labels" / name, run_dir / "students" / "kd" / "features" / name))
        assert len(fanned_ids) == len(inline_ids) > 0
        for (a_ids, a_off, _), (b_ids, b_off, _) in zip(fanned_ids, inline_ids, strict=True):
            np.testing.assert_array_equal(a_ids, b_ids)
            np.testing.assert_array_equal(a_off, b_off)
    assert kd["dev_accuracy"] > 0
