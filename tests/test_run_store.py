"""The run store: a stage's record written once with its fingerprint, the one freshness rule, the file fingerprint,
the cache keys and the fingerprinted table."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from sparse_distill import __version__, run_store


def test_a_record_is_written_once_with_its_fingerprint_stage_and_version(tmp_path: Path) -> None:
    out = run_store.stage_dir(tmp_path, "distill")
    assert out == tmp_path / "students" / "kd"
    record = run_store.write_result(out, "distill", "fp1", {"model_dir": "m", "dev_accuracy": 0.5})
    assert record == {
        "model_dir": "m",
        "dev_accuracy": 0.5,
        "fingerprint": "fp1",
        "stage": "distill",
        "library_version": __version__,
    }
    assert json.loads((out / run_store.RESULT).read_text()) == record
    assert run_store.read_stage(tmp_path, "distill") == record
    assert [p.name for p in out.iterdir()] == [run_store.RESULT]  # no temporary left behind


def test_fresh_means_a_record_made_for_the_same_fingerprint(tmp_path: Path) -> None:
    assert not run_store.is_fresh(tmp_path, "vocab", "fp1")  # missing
    run_store.write_result(run_store.stage_dir(tmp_path, "vocab"), "vocab", "fp1", {"size": 3})
    assert run_store.is_fresh(tmp_path, "vocab", "fp1")
    assert not run_store.is_fresh(tmp_path, "vocab", "fp2")  # made for another config
    # A record from before fingerprints were recorded is never fresh.
    (run_store.stage_dir(tmp_path, "vocab") / run_store.RESULT).write_text(json.dumps({"size": 3}))
    assert not run_store.is_fresh(tmp_path, "vocab", "fp1")
    assert run_store.fresh_result(tmp_path / "nowhere", "fp1") is None


def test_a_record_copied_from_another_run_folder_is_not_fresh_there(tmp_path: Path) -> None:
    record = {"size": 3, "out_dir": str(run_store.stage_dir(tmp_path / "a", "vocab"))}
    run_store.write_result(run_store.stage_dir(tmp_path / "a", "vocab"), "vocab", "fp1", record)
    assert run_store.fresh_stage(tmp_path / "a", "vocab", "fp1")["size"] == 3
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert not run_store.is_fresh(tmp_path / "b", "vocab", "fp1")  # its files are the old folder's


def test_cached_computes_once_per_fingerprint(tmp_path: Path) -> None:
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"n": len(calls)}

    first = run_store.cached(tmp_path / "variant", "variant", "fp1", compute)
    again = run_store.cached(tmp_path / "variant", "variant", "fp1", compute)
    assert first == again and first["n"] == 1 and len(calls) == 1
    assert run_store.cached(tmp_path / "variant", "variant", "fp2", compute)["n"] == 2


def test_the_file_fingerprint_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("text,label\na,0\n")
    before = run_store.file_fingerprint(str(path))
    assert before["path"] == str(path.resolve()) and before["size"] == path.stat().st_size
    assert run_store.file_fingerprint(str(path)) == before
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert run_store.file_fingerprint(str(path)) != before
    assert run_store.file_fingerprint("hub:imdb") == {"path": "hub:imdb"}  # no local file to stat


def test_the_content_fingerprint_follows_the_bytes_not_the_path_or_time(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPARSE_DISTILL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "train.csv"
    path.write_text("text,label\na good film,pos\n")
    before = run_store.content_fingerprint(str(path))
    assert before["size"] == path.stat().st_size and "path" not in before
    # Copied elsewhere, or touched: the same data, the same key (a re-synced data set keeps its teacher).
    copy = tmp_path / "elsewhere" / "train.csv"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert run_store.content_fingerprint(str(copy)) == before == run_store.content_fingerprint(str(path))
    # One label changed, the same length: another key.
    path.write_text("text,label\na good film,neg\n")
    assert run_store.content_fingerprint(str(path)) != before
    # Each version's digest is kept (read once per version): the original, its copy, the touched and the edited file.
    assert len(list((tmp_path / "cache" / "digests").iterdir())) == 4
    # A folder of files (a saved `datasets` folder) by its files' names and bytes.
    folder = tmp_path / "saved"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "data.arrow").write_bytes(b"1234")
    first = run_store.content_fingerprint(str(folder))
    (folder / "train" / "data.arrow").write_bytes(b"1235")
    assert run_store.content_fingerprint(str(folder)) != first
    assert run_store.content_fingerprint("hub:imdb") == {"path": "hub:imdb"}


def test_the_stage_key_names_the_stage_its_fingerprint_and_the_run_dir(tmp_path: Path) -> None:
    key = run_store.stage_key(tmp_path / "run", "teacher", "abc")
    assert key.startswith("sparse-distill-teacher-abc-")
    assert key == run_store.stage_key(str(tmp_path / "run"), "teacher", "abc")
    assert key != run_store.stage_key(tmp_path / "other", "teacher", "abc")


def test_a_fingerprinted_table_is_read_back_only_for_its_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "augmented" / "eda.parquet"
    assert run_store.read_fresh_table(path, "fp1") is None
    run_store.write_table(pa.table({"text": ["a", "b"]}), path, "fp1")
    table = run_store.read_fresh_table(path, "fp1")
    assert table is not None and table.column("text").to_pylist() == ["a", "b"]
    assert run_store.read_fresh_table(path, "fp2") is None


@pytest.mark.parametrize("stage", ["transfer", "label_transfer"])
def test_the_transfer_stages_have_folders(tmp_path: Path, stage: str) -> None:
    assert run_store.stage_dir(tmp_path, stage).relative_to(tmp_path).parts[-1] == "transfer"
