"""Labelling into Parquet shards: the schema, resuming, failed and corrupt shards, changed inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_distill.config import LabelJob
from sparse_distill.data import DataError
from sparse_distill.labelling import label_status, prepare_job, run_label_job
from sparse_distill.shard_plan import CorpusSource, ShardPlan, plan_shards
from sparse_distill.soft_labels import LABELLING, iter_soft_labels
from sparse_distill.teacher import TeacherPredictor


def _texts(n: int = 250) -> list[str]:
    return [f"review number {i} was {'good' if i % 2 else 'bad'}" for i in range(n)]


@pytest.fixture
def corpus(tmp_path):
    pq.write_table(pa.table({"text": _texts()}), tmp_path / "corpus.parquet", row_group_size=64)
    return tmp_path / "corpus.parquet"


def _job(teacher, corpus, out, **label) -> LabelJob:
    return LabelJob(
        teacher=str(teacher),
        corpus=[str(c) for c in (corpus if isinstance(corpus, list) else [corpus])],
        out=str(out),
        max_length=32,
        label={"shard_size": 100, "batch_size": 16, **label},
    )


def _mtimes(out) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}


def test_plan_is_deterministic_and_written_before_any_work(tiny_teacher, corpus, tmp_path):
    a = plan_shards([CorpusSource(str(corpus))], 100)
    b = plan_shards([CorpusSource(str(corpus))], 100)
    assert [(s.start, s.stop) for s in a.shards] == [(0, 100), (100, 200), (200, 250)]
    assert a.to_json() == b.to_json()
    prep = prepare_job(_job(tiny_teacher, corpus, tmp_path / "out"))
    assert prep["pending"] == [0, 1, 2] and prep["rows_total"] == 250
    assert ShardPlan.load(tmp_path / "out", LABELLING).to_json()["shards"] == a.to_json()["shards"]
    assert not list((tmp_path / "out" / "shards").iterdir())


def test_label_writes_schema_resumes_and_redoes_corrupt_shards(tiny_teacher, corpus, tmp_path):
    out = tmp_path / "labels"
    job = _job(tiny_teacher, corpus, out)
    status = run_label_job(job)
    assert (status["done"], status["failed"], status["rows_written"]) == (3, 0, 250)
    table = pq.read_table(out / "shards" / "00000.parquet")
    assert table.schema.field("id").type == pa.string()
    assert table.schema.field("probs").type == pa.list_(pa.float32())
    assert table.schema.field("logits").type == pa.list_(pa.float32())
    probs = np.array(table.column("probs").to_pylist())
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    expected = TeacherPredictor(tiny_teacher, max_length=32).predict_proba(_texts()[:100])
    np.testing.assert_allclose(probs, expected, atol=1e-5)

    # Re-run: nothing is relabelled. A truncated shard, a garbled record and a stray temporary file are handled.
    mtimes = _mtimes(out)
    run_label_job(job)
    assert _mtimes(out) == mtimes
    with open(out / "shards" / "00001.parquet", "r+b") as f:
        f.truncate(100)
    (out / "shards" / "00002.json").write_text("{not json")
    (out / "shards" / ".00000.parquet.abc.tmp").write_bytes(b"partial")
    assert prepare_job(job)["pending"] == [1, 2]
    run_label_job(job)
    after = _mtimes(out)
    assert after["00000.parquet"] == mtimes["00000.parquet"]
    assert after["00001.parquet"] != mtimes["00001.parquet"] and after["00002.parquet"] != mtimes["00002.parquet"]
    ids = [i for s in range(3) for i in pq.read_table(out / "shards" / f"{s:05d}.parquet").column("id").to_pylist()]
    assert ids == [f"corpus.parquet:{i}" for i in range(250)]
    streamed = list(iter_soft_labels(out))
    assert sum(len(t) for t, _ in streamed) == 250 and streamed[0][0][:100] == _texts()[:100]
    assert not [p for p in os.listdir(out / "shards") if p.endswith(".tmp")]
    assert json.loads((out / "manifest.json").read_text())["shards"][1]["status"] == "done"


def test_a_bad_row_fails_its_shard_only_and_a_fixed_file_relabels_only_that_shard(tiny_teacher, tmp_path):
    texts = _texts()
    texts[150] = "   "
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(texts) + "\n")
    out = tmp_path / "labels"
    status = run_label_job(_job(tiny_teacher, path, out))
    assert (status["done"], status["failed"]) == (2, 1)
    assert "corpus.txt: row 150, column 'text': text is empty" in status["failed_shards"][0]["error"]
    assert label_status(out)["failed_shards"][0]["shard"] == "00001.parquet"
    mtimes = _mtimes(out)

    texts[150] = "a fixed review"
    path.write_text("\n".join(texts) + "\n")
    status = run_label_job(_job(tiny_teacher, path, out))
    assert (status["done"], status["failed"], status["rows_written"]) == (3, 0, 250)
    after = _mtimes(out)
    assert after["00000.parquet"] == mtimes["00000.parquet"] and after["00002.parquet"] == mtimes["00002.parquet"]


def test_an_edit_elsewhere_in_the_file_redoes_the_shards_it_touched(tiny_teacher, corpus, tmp_path):
    out = tmp_path / "labels"
    run_label_job(_job(tiny_teacher, corpus, out))
    mtimes = _mtimes(out)
    texts = _texts()
    texts[5] = "an edited review"
    pq.write_table(pa.table({"text": texts}), corpus, row_group_size=64)
    assert prepare_job(_job(tiny_teacher, corpus, out))["pending"] == [0]
    run_label_job(_job(tiny_teacher, corpus, out))
    after = _mtimes(out)
    assert after["00000.parquet"] != mtimes["00000.parquet"] and after["00001.parquet"] == mtimes["00001.parquet"]


def test_another_corpus_in_the_same_output_needs_replan(tiny_teacher, corpus, tmp_path):
    out = tmp_path / "labels"
    run_label_job(_job(tiny_teacher, corpus, out))
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"text": _texts(120)}), other)
    with pytest.raises(DataError, match="another corpus or shard size"):
        prepare_job(_job(tiny_teacher, other, out))
    with pytest.raises(DataError, match="another corpus or shard size"):
        prepare_job(_job(tiny_teacher, corpus, out, shard_size=50))
    job = _job(tiny_teacher, other, out).model_copy(update={"replan": True})
    status = run_label_job(job)
    assert (status["shards"], status["rows_written"]) == (2, 120)
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == ["00000.parquet", "00001.parquet"]


def test_files_with_the_same_name_get_distinct_ids(tiny_teacher, tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        pq.write_table(pa.table({"text": _texts(30)}), tmp_path / d / "part-0.parquet")
    out = tmp_path / "labels"
    run_label_job(_job(tiny_teacher, [tmp_path / "*" / "part-0.parquet"], out))
    ids = [i for p in sorted((out / "shards").glob("*.parquet")) for i in pq.read_table(p).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 60 and ids[0] == "a/part-0.parquet:0" and ids[-1] == "b/part-0.parquet:29"


def test_unfinished_shard_blocks_distillation_with_a_clear_error(corpus, tmp_path):
    out = tmp_path / "labels"
    plan_shards([CorpusSource(str(corpus))], 100).save(out)
    with pytest.raises(DataError, match="shard 00000.parquet is pending"):
        next(iter_soft_labels(out))
    assert ShardPlan.load(out, LABELLING).total_rows == 250


def test_soft_labels_join_back_to_an_edited_text_file(tiny_teacher, tmp_path):
    texts = _texts()
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(texts) + "\n")
    out = tmp_path / "labels"
    run_label_job(_job(tiny_teacher, path, out))
    texts[10] = "a much longer replacement review that shifts every later byte offset"
    path.write_text("\n".join(texts) + "\n")
    run_label_job(_job(tiny_teacher, path, out))
    assert [t for batch, _ in iter_soft_labels(out) for t in batch] == texts


def test_labels_made_with_another_max_length_are_made_again(tiny_teacher, corpus, tmp_path):
    out = tmp_path / "labels"
    run_label_job(_job(tiny_teacher, corpus, out))
    record = json.loads((out / "shards" / "00000.json").read_text())
    assert record["settings"] == {"max_length": 32, "precision": "auto", "int8": False}
    shorter = _job(tiny_teacher, corpus, out, max_length=8)
    assert prepare_job(shorter)["pending"] == [0, 1, 2]
    run_label_job(shorter)
    probs = np.concatenate([p for _, p in iter_soft_labels(out)])
    np.testing.assert_allclose(probs, TeacherPredictor(tiny_teacher, max_length=8).predict_proba(_texts()), atol=1e-5)
    # a record from before settings were recorded is taken as made with the job's settings, not labelled again
    for path in (out / "shards").glob("*.json"):
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "settings"}))
    assert prepare_job(_job(tiny_teacher, corpus, out))["pending"] == []


def test_a_grown_or_cut_row_limit_keeps_the_shards_both_plans_share(tiny_teacher, corpus, tmp_path):
    out = tmp_path / "labels"
    limited = _job(tiny_teacher, corpus, out).model_copy(update={"limit": 150})
    assert run_label_job(limited)["rows_written"] == 150  # shards 0-99 and 100-149
    mtimes = _mtimes(out)
    grown = _job(tiny_teacher, corpus, out)
    assert prepare_job(grown)["pending"] == [1, 2]  # 100-149 grew to 100-199; 200-249 is new
    status = run_label_job(grown)
    assert (status["done"], status["rows_written"]) == (3, 250)
    after = _mtimes(out)
    assert after["00000.parquet"] == mtimes["00000.parquet"] and after["00001.parquet"] != mtimes["00001.parquet"]
    assert [len(t) for t, _ in iter_soft_labels(out)] == [100, 100, 50]
    # cut back: the shards past the limit go, the first stays as it was
    status = run_label_job(_job(tiny_teacher, corpus, out).model_copy(update={"limit": 100}))
    assert (status["shards"], status["rows_written"]) == (1, 100)
    assert sorted(os.listdir(out / "shards")) == ["00000.json", "00000.parquet"]
    assert _mtimes(out)["00000.parquet"] == mtimes["00000.parquet"]
