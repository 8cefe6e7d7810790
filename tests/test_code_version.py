"""The code fingerprint in the students' cache keys: what changes it and what does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparse_distill import code_version, pipeline
from sparse_distill.code_version import code_fingerprint, module_closure
from sparse_distill.config import DataConfig, PipelineConfig, TeacherConfig

MODULES = {
    "a.py": (
        '"""Module a."""\nfrom sparse_distill import b\nfrom sparse_distill.config import X\n\n\n'
        "def f():\n    return b.g()\n"
    ),
    "b.py": "from .c import h\nfrom torch.utils import data\n\n\ndef g():\n    return h() + 1\n",
    "c.py": "def h():\n    # one\n    return 1\n",
    "d.py": "import sparse_distill.c\n\n\ndef unused():\n    return 2\n",
    "data.py": "VALUE = 3\n",
    "config.py": "X = 1\n",
    "__init__.py": "",
    "stages.py": (
        "from sparse_distill import a\n\n\ndef helper():\n    return 1\n\n\ndef other():\n    return 5\n\n\n"
        "def run():\n    '''Doc.'''\n    return helper() + a.f()\n"
    ),
}


def _package(root: Path, **changed: str) -> Path:
    """A throwaway package folder (a new one per call, so the fingerprint cache never serves an old one)."""
    folder = root / f"pkg{len(list(root.iterdir()))}"
    folder.mkdir()
    for name, text in {**MODULES, **{k.replace("_py", ".py"): v for k, v in changed.items()}}.items():
        (folder / name).write_text(text)
    return folder


def test_closure_follows_the_package_imports_only(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    # a -> b (absolute) -> c (relative); config is ignored, and torch.utils' `data` is not the package's data.py.
    assert module_closure("a", package_dir=pkg) == ["a", "b", "c"]
    assert module_closure("d", package_dir=pkg) == ["c", "d"]
    with pytest.raises(ValueError, match="no module sparse_distill.nope"):
        code_fingerprint("nope", package_dir=pkg)
    # Installed without its sources: no code in the key, and no error.
    (pkg / "__init__.py").unlink()
    assert code_fingerprint("a", package_dir=pkg) == "no-source"


def test_fingerprint_changes_with_statements_not_comments_docstrings_or_layout(tmp_path: Path) -> None:
    base = code_fingerprint("a", package_dir=_package(tmp_path))
    same = [
        {"c_py": "def h():\n    # another comment\n\n    return 1\n"},
        {"a_py": MODULES["a.py"].replace('"""Module a."""', '"""Another docstring."""')},
        {"d_py": "def unused():\n    return 99\n"},  # not imported by a
        {"config_py": "X = 2\n"},  # config values are in the keys themselves
    ]
    for change in same:
        assert code_fingerprint("a", package_dir=_package(tmp_path, **change)) == base, change
    # A changed statement two imports away changes it.
    assert code_fingerprint("a", package_dir=_package(tmp_path, c_py="def h():\n    return 2\n")) != base


def test_function_entries_hash_the_function_and_the_helpers_it_names(tmp_path: Path) -> None:
    base = code_fingerprint("a", "stages:run", package_dir=_package(tmp_path))
    stages = MODULES["stages.py"]
    unchanged = stages.replace("return 5", "return 6")  # a function `run` never names
    assert code_fingerprint("a", "stages:run", package_dir=_package(tmp_path, stages_py=unchanged)) == base
    helper = stages.replace("def helper():\n    return 1", "def helper():\n    return 7")
    assert code_fingerprint("a", "stages:run", package_dir=_package(tmp_path, stages_py=helper)) != base
    with pytest.raises(ValueError, match="no top-level function missing"):
        code_fingerprint("stages:missing", package_dir=_package(tmp_path))


def test_the_students_keys_hold_the_training_code_and_the_earlier_stages_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("t.parquet", "d.parquet"):
        (tmp_path / name).write_bytes(b"")
    data = DataConfig(train=str(tmp_path / "t.parquet"), dev=str(tmp_path / "d.parquet"))
    cfg = PipelineConfig(data=data, teacher=TeacherConfig(model="m"))
    assert {"student", "sparse_optim", "training"} <= set(module_closure(*pipeline.STAGE_CODE["distill"][:1]))
    before = pipeline.stage_fingerprints(cfg)
    monkeypatch.setattr(pipeline, "code_fingerprint", lambda *names: "changed-" + ",".join(names))
    after = pipeline.stage_fingerprints(cfg)
    changed = {stage for stage in before if before[stage] != after[stage]}
    assert changed == {"distill", "kdft", "scratch", "evaluate"}


def test_the_real_package_fingerprints_are_stable_within_a_process() -> None:
    first = code_fingerprint(*pipeline.STAGE_CODE["distill"])
    code_version._fingerprint.cache_clear()
    code_version._closure.cache_clear()
    assert code_fingerprint(*pipeline.STAGE_CODE["distill"]) == first
    assert len(first) == 16
