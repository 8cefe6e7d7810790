"""The atomic writers: a failure or a crash at any step leaves the old output or the new one, complete, never
neither; temporary files and folders are cleaned up."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_distill import data
from sparse_distill.data import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_parquet,
    atomic_write_text,
    recover_dir,
    remove_temporaries,
    write_dir_atomically,
)


def _siblings(path: Path) -> list[str]:
    """Everything next to `path` but `path` itself."""
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def _fill(version: str):
    def write(tmp: Path) -> None:
        for i in range(3):
            (tmp / f"part{i}.txt").write_text(version)

    return write


def _version(folder: Path) -> str:
    """The version a folder holds, checking it is complete (every part from the same write)."""
    versions = {(folder / f"part{i}.txt").read_text() for i in range(3)}
    assert len(versions) == 1, f"{folder} mixes writes: {versions}"
    return versions.pop()


def test_file_writers_write_and_replace(tmp_path):
    atomic_write_text(tmp_path / "a" / "t.json", "one")
    atomic_write_text(tmp_path / "a" / "t.json", "two")
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    table = pa.table({"x": [1, 2, 3]})
    atomic_write_parquet(table, tmp_path / "a" / "t.parquet")
    atomic_write(tmp_path / "a" / "z.npz", lambda tmp: np.savez(tmp, x=np.arange(3)), suffix=".npz")
    assert (tmp_path / "a" / "t.json").read_text() == "two"
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert pq.read_table(tmp_path / "a" / "t.parquet").equals(table)
    assert np.load(tmp_path / "a" / "z.npz")["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin", "t.json", "t.parquet", "z.npz"]
    assert oct((tmp_path / "a" / "t.json").stat().st_mode & 0o777) == oct(0o644)


@pytest.mark.parametrize("step", ["write", "rename"])
def test_a_failed_file_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, step):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")

    def broken_write(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    if step == "rename":
        monkeypatch.setattr(data.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("injected")))
    with pytest.raises(OSError):
        atomic_write(path, broken_write if step == "write" else lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "old"
    assert _siblings(path) == []


def _fail_on_call(monkeypatch, n: int) -> None:
    """Make the n-th call of os.replace (counting from 1) in the writer raise."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == n:
            raise OSError(f"injected failure of rename {n}")
        return real(src, dst)

    monkeypatch.setattr(data.os, "replace", replace)


@pytest.mark.parametrize("step", [0, 1, 2])
def test_a_failed_folder_write_keeps_the_old_folder_and_cleans_up(tmp_path, monkeypatch, step):
    # step 0: the write itself fails; 1: moving the old folder aside fails; 2: renaming the new one in fails.
    out = tmp_path / "model"
    write_dir_atomically(out, _fill("old"))
    if step:
        _fail_on_call(monkeypatch, step)
        write = _fill("new")
    else:

        def write(tmp: Path) -> None:
            (tmp / "part0.txt").write_text("new")
            raise RuntimeError("injected failure while writing")

    with pytest.raises((OSError, RuntimeError), match="injected"):
        write_dir_atomically(out, write)
    assert _version(out) == "old"
    assert _siblings(out) == []
    monkeypatch.undo()
    write_dir_atomically(out, _fill("new"))
    assert _version(out) == "new" and _siblings(out) == []


def _crash_in_child(out: Path, crash_at: str) -> None:
    """Replace `out` in a forked child that dies (no clean-up, like kill -9) at `crash_at`."""
    pid = os.fork()
    if pid == 0:  # the child
        try:
            real_replace, real_rmtree = os.replace, data.shutil.rmtree

            def replace(src, dst):
                if crash_at == f"before {Path(dst).name}":
                    os._exit(0)
                return real_replace(src, dst)

            def rmtree(path, *a, **kw):
                if crash_at == "before deleting the old folder" and Path(path).name.endswith(".old"):
                    os._exit(0)
                return real_rmtree(path, *a, **kw)

            def write(tmp: Path) -> None:
                _fill("new")(tmp)
                if crash_at == "while writing":
                    (tmp / "part1.txt").write_text("torn")
                    os._exit(0)

            data.os.replace, data.shutil.rmtree = replace, rmtree
            write_dir_atomically(out, write)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


@pytest.mark.parametrize(
    "crash_at", ["while writing", "before .model.old", "before model", "before deleting the old folder"]
)
def test_a_crash_at_any_step_leaves_a_complete_folder_after_recovery(tmp_path, crash_at):
    out = tmp_path / "model"
    write_dir_atomically(out, _fill("old"))
    _crash_in_child(out, crash_at)
    # What the crash left: the live folder, or (between the two renames) only the complete old one moved aside.
    aside = out.with_name(".model.old")
    assert out.exists() or _version(aside) == "old"
    recover_dir(out)
    expected = "new" if crash_at == "before deleting the old folder" else "old"
    assert _version(out) == expected
    assert _siblings(out) == []
    # The next write starts from there, and leaves only the new folder.
    write_dir_atomically(out, _fill("newer"))
    assert _version(out) == "newer" and _siblings(out) == []


def test_remove_temporaries_removes_only_temporary_files_and_folders(tmp_path):
    (tmp_path / "00000.parquet").write_bytes(b"kept")
    (tmp_path / ".00000.parquet.abc.tmp").write_bytes(b"partial")
    (tmp_path / ".vocab.lookup.npz.abc.tmp.npz").write_bytes(b"partial")
    (tmp_path / ".model.tmp").mkdir()
    (tmp_path / ".model.tmp" / "x").write_text("partial")
    assert remove_temporaries(tmp_path) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["00000.parquet"]


def test_teacher_checkpoint_is_never_missing_when_its_replacement_fails(tmp_path, monkeypatch):
    from sparse_distill.data import LabelMap
    from sparse_distill.teacher import _save_checkpoint

    class Saves:
        def __init__(self, version: str) -> None:
            self.version = version

        def save_pretrained(self, folder: str, **_: object) -> None:
            Path(folder, f"{type(self).__name__}.json").write_text(self.version)

    class Model(Saves):
        pass

    class Tokenizer(Saves):
        pass

    best = tmp_path / "teacher" / "model"
    lm = LabelMap.from_values([0, 1])
    _save_checkpoint(Model("step 10"), Tokenizer("step 10"), best, lm, {"step": 10})
    _fail_on_call(monkeypatch, 2)  # renaming the new checkpoint in fails, after the old one was moved aside
    with pytest.raises(OSError, match="injected"):
        _save_checkpoint(Model("step 20"), Tokenizer("step 20"), best, lm, {"step": 20})
    assert (best / "Model.json").read_text() == "step 10"
    assert json.loads((best / "training_info.json").read_text()) == {"step": 10}
    assert _siblings(best) == []
