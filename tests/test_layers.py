"""The layers hold by construction: the library (`sparse_distill/`) never imports the orchestration (Prefect, `flows`,
`tasks`), not even lazily inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parent.parent / "sparse_distill"
FORBIDDEN = ("prefect", "prefect_dask", "flows", "tasks")
# Calls that import a module named by a string.
IMPORT_CALLS = {"import_module", "__import__"}


def _forbidden(module: str | None) -> bool:
    top = (module or "").split(".")[0]
    return top in FORBIDDEN or top.startswith("prefect")


def orchestration_imports(source: str, filename: str) -> list[str]:
    """`file:line: what` for each import of Prefect, `flows` or `tasks` in the source, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from . import x` (level > 0) stays inside the package; only absolute imports can leave it.
            names = [node.module] if node.level == 0 else []
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            names = [node.args[0].value] if name in IMPORT_CALLS and isinstance(node.args[0].value, str) else []
        else:
            continue
        found += [f"{filename}:{node.lineno}: imports {n}" for n in names if _forbidden(n)]
    return found


def test_the_library_never_imports_the_orchestration():
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 10 and LIBRARY / "__init__.py" in files
    problems = []
    for path in files:
        problems += orchestration_imports(path.read_text(), str(path.relative_to(LIBRARY.parent)))
    assert not problems, "the library must not import Prefect, flows or tasks:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        "import prefect",
        "import os, flows.cli",
        "from prefect.tasks import task",
        "from tasks import stages",
        "def f():\n    if True:\n        from flows.pipeline_flow import pipeline_flow",
        "import importlib\nimportlib.import_module('flows.label_flow')",
        "from importlib import import_module\nimport_module('prefect_dask')",
        "__import__('tasks.stages')",
    ],
)
def test_the_check_sees_every_kind_of_import(source):
    problems = orchestration_imports(source, "x.py")
    assert len(problems) == 1 and problems[0].startswith("x.py:"), problems


@pytest.mark.parametrize(
    "source",
    ["import taskset", "from sparse_distill import tasks_util", "from . import flows", "x = 'import prefect'"],
)
def test_the_check_lets_the_library_through(source):
    assert orchestration_imports(source, "x.py") == []
