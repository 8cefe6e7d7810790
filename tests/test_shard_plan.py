"""The shard plan labelling and counting share: planning, reopening, replanning, records, old formats, the runner."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_distill.counting import COUNTING, SpillRecord
from sparse_distill.data import DataError
from sparse_distill.shard_plan import (
    MANIFEST,
    CorpusSource,
    PlanKind,
    ShardPlan,
    ShardRecord,
    collect_records,
    input_checksum,
    open_plan,
    pending_work,
    plan_shards,
    read_record,
    read_shard,
    record_failure,
    run_pending,
    write_record,
)
from sparse_distill.soft_labels import LABELLING, LabelRecord


@dataclass
class _Record(ShardRecord):
    note: str = ""


KIND = PlanKind(name="test", outputs="outputs", records="out", record_type=_Record, settings_file="settings.json")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(f"document {i}\n" for i in range(25)))
    return [CorpusSource(str(path))]


def test_plan_cuts_each_file_into_row_ranges_and_round_trips(corpus, tmp_path):
    plan = plan_shards(corpus, 10)
    assert [(s.start, s.stop) for s in plan.shards] == [(0, 10), (10, 20), (20, 25)]
    assert plan.shards[1].offset == len("".join(f"document {i}\n" for i in range(10)))
    plan.save(tmp_path / "o")
    again = ShardPlan.load(tmp_path / "o", KIND)
    assert again.to_json() == plan.to_json() and again.total_rows == 25


def test_errors_name_the_folder_and_the_kind_of_plan(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"no counting manifest \(manifest.json\) in {tmp_path}"):
        ShardPlan.load(tmp_path, COUNTING)
    (tmp_path / MANIFEST).write_text("{}")
    with pytest.raises(DataError, match="not a labelling manifest"):
        ShardPlan.load(tmp_path, LABELLING)


def test_reopening_keeps_the_plan_sweeps_temporaries_and_refuses_other_inputs(corpus, tmp_path):
    out = tmp_path / "o"
    plan = open_plan(out, KIND, corpus, 10, settings={"n": 1})
    write_record(out, KIND, _Record(**vars(plan.shards[0].spec()), status="done", note="kept"))
    (out / "out" / ".00001.parquet.x.tmp").write_bytes(b"partial")
    again = open_plan(out, KIND, corpus, 10, settings={"n": 1})
    assert again.to_json() == plan.to_json()
    assert read_record(out, KIND, again.shards[0]).note == "kept"
    assert not list((out / "out").glob(".*.tmp"))
    for shard_size, settings in ((5, {"n": 1}), (10, {"n": 2})):
        with pytest.raises(DataError, match="another corpus or shard size or settings.*--replan"):
            open_plan(out, KIND, corpus, shard_size, settings=settings)
    replanned = open_plan(out, KIND, corpus, 5, replan=True, settings={"n": 2})
    assert len(replanned.shards) == 5 and not list((out / "out").iterdir())
    assert json.loads((out / "settings.json").read_text()) == {"n": 2}


def test_a_file_edited_in_place_redoes_only_the_shards_it_touched(corpus, tmp_path):
    out = tmp_path / "o"
    plan = open_plan(out, KIND, corpus, 10, settings={})
    for shard in plan.shards:
        texts, ids = read_shard(corpus[0], shard)
        write_record(out, KIND, _Record(**vars(shard.spec()), status="done", input_checksum=input_checksum(ids, texts)))
    lines = [f"document {i}" for i in range(25)]
    lines[12] = "an edited, longer document"
    (tmp_path / "c.txt").write_text("".join(line + "\n" for line in lines))
    plan = open_plan(out, KIND, corpus, 10, settings={})
    assert [read_record(out, KIND, s) is not None for s in plan.shards] == [True, False, True]


def test_records_belong_to_their_shard_and_failures_keep_their_error(corpus, tmp_path):
    plan = plan_shards(corpus, 10)
    write_record(tmp_path, KIND, _Record(**vars(plan.shards[1].spec()), status="done"))
    (tmp_path / "out" / "00000.json").write_text("{not json")
    # A record of another plan's shard 2 (other rows) does not count for this plan's shard 2.
    write_record(tmp_path, KIND, _Record(2, 0, 20, 24, status="done"))
    collected = collect_records(tmp_path, KIND, plan_shards(corpus, 10))
    assert [s.status for s in collected.shards] == ["pending", "done", "pending"]
    failed = record_failure(tmp_path, KIND, plan.shards[0], "DataError: bad row")
    assert read_record(tmp_path, KIND, plan.shards[0]) == failed and failed.error == "DataError: bad row"


def test_records_and_manifests_of_the_earlier_format_still_load(corpus, tmp_path):
    # Before the shared plan, a counting manifest held labelling's fields and spill records had no offset.
    plan = plan_shards(corpus, 10)
    old = plan.to_json()
    for s in old["shards"]:
        s.update(status="pending", rows=0, checksum=None, teacher_fingerprint=None, input_checksum=None)
        s.update(seconds=0.0, error=None)
    (tmp_path / MANIFEST).write_text(json.dumps(old))
    assert ShardPlan.load(tmp_path, COUNTING).to_json() == plan.to_json()
    spill = {"index": 0, "source": 0, "start": 0, "stop": 10, "status": "done", "docs": 10, "input_checksum": "x"}
    spill |= {"spill_bytes": 5, "distinct": 3, "seconds": 0.1, "row_groups": [[0, 0, 3, 40]], "error": None}
    (tmp_path / "spills").mkdir()
    (tmp_path / "spills" / "00000.json").write_text(json.dumps(spill))
    rec = read_record(tmp_path, COUNTING, plan.shards[0])
    assert isinstance(rec, SpillRecord) and rec.row_groups == [[0, 0, 3, 40]] and rec.docs == 10
    label = {"index": 1, "source": 0, "start": 10, "stop": 20, "offset": 3, "status": "done", "rows": 10}
    label |= {"checksum": "c", "teacher_fingerprint": "t", "input_checksum": "i", "seconds": 1.0, "error": None}
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00001.json").write_text(json.dumps(label))
    rec = read_record(tmp_path, LABELLING, plan.shards[1])
    assert isinstance(rec, LabelRecord) and (rec.rows, rec.checksum, rec.offset) == (10, "c", plan.shards[1].offset)


def test_the_runner_records_a_failure_and_goes_on(corpus, tmp_path):
    plan = plan_shards(corpus, 10)
    prep = pending_work(tmp_path, plan, [0, 2])
    assert (prep["rows_done"], prep["rows_total"]) == (10, 25)
    seen, failures, progress = [], [], []

    def run_one(work):
        seen.append(work["shard"]["index"])
        if work["shard"]["index"] == 0:
            raise MemoryError("injected")

    failed = run_pending(prep, run_one, lambda w, e: failures.append(e), lambda d, t: progress.append((d, t)))
    assert failed == [0] and seen == [0, 2] and failures == ["MemoryError: injected"]
    assert progress == [(10, 25), (15, 25)]


def test_parquet_sources_are_planned_by_row_count(tmp_path):
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(7)]}), tmp_path / "a.parquet", row_group_size=3)
    plan = plan_shards([CorpusSource(str(tmp_path / "a.parquet"))], 4)
    assert [(s.start, s.stop, s.offset) for s in plan.shards] == [(0, 4, None), (4, 7, None)]
