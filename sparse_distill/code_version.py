"""Which version of the library's code computed a stage: a fingerprint of the modules it runs.

Stage cache keys hold the stage's config and its inputs' fingerprints. That misses a change in how a stage computes
under an unchanged config (a fix to the training loop, a new default inside a function): the old result would be
served as if it were the new one. So the keys of the students and the evaluation (`pipeline.STAGE_CODE`, and the
experiments' students) also hold `code_fingerprint` of their modules: the module and every module of this package it
imports, followed transitively, each as its syntax tree without docstrings. Comments, docstrings, formatting and line
numbers do not change it; a changed statement anywhere in the imported code does.

`config.py` is left out: the config's values are already in every key, and its help texts change often.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "sparse_distill"
PACKAGE_DIR = Path(__file__).resolve().parent
# Modules whose contents never decide what a stage computes: config values are hashed themselves, and the package's
# __init__ only re-exports (following it would make every key depend on every module).
IGNORED = frozenset({"config", "__init__"})


def code_fingerprint(*modules: str, package_dir: Path = PACKAGE_DIR) -> str:
    """A short hash of the code of `modules` and everything of the package they import.

    A name is a module inside the package ("training", "experiments.base"), or "module:function" for one top-level
    function of a module and the module's top-level functions and classes it names, followed transitively (not the
    module's imports: list those modules too). The pipeline's stage functions are hashed that way, since the
    pipeline module imports every other one.

    An installation without the package's source files (compiled files only) gives "no-source": the keys then
    fall back to config, inputs and the library version.
    """
    if not (package_dir / "__init__.py").is_file():
        return "no-source"
    return _fingerprint(tuple(sorted(set(modules))), package_dir.resolve())


def module_closure(*modules: str, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """The package modules that `modules` import, directly or not (themselves included), sorted."""
    return sorted(_closure(tuple(sorted(set(modules))), package_dir.resolve()))


@lru_cache(maxsize=64)
def _fingerprint(modules: tuple[str, ...], package_dir: Path) -> str:
    digest = hashlib.sha256()
    whole = [m for m in modules if ":" not in m]
    for name in sorted(_closure(tuple(whole), package_dir)):
        digest.update(name.encode() + b"\0" + _module_dump(_module_path(name, package_dir)).encode() + b"\0")
    for entry in sorted(m for m in modules if ":" in m):
        module, function = entry.split(":", 1)
        for node in _functions(module, function, package_dir):
            digest.update(f"{module}:{node.name}".encode() + b"\0" + _dump(node).encode() + b"\0")
    return digest.hexdigest()[:16]


Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _functions(module: str, function: str, package_dir: Path) -> list[Definition]:
    """The top-level definition `function` of `module` and the module's top-level definitions it names, transitively."""
    path = _module_path(module, package_dir)
    if path is None:
        raise ValueError(f"{module}: no module {PACKAGE}.{module} in {package_dir}")
    defs = {n.name: n for n in _tree(path).body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    if function not in defs:
        raise ValueError(f"{module}:{function}: no top-level function {function} in {path}")
    seen: dict[str, Definition] = {}
    todo = [function]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen[name] = defs[name]
        todo.extend(n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name) and n.id in defs)
    return [seen[k] for k in sorted(seen)]


@lru_cache(maxsize=64)
def _closure(modules: tuple[str, ...], package_dir: Path) -> frozenset[str]:
    seen: set[str] = set()
    todo = [m for m in modules if m not in IGNORED]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_path(name, package_dir)
        if path is None:
            raise ValueError(f"{name}: no module {PACKAGE}.{name} in {package_dir}")
        seen.add(name)
        todo.extend(m for m in _imported(path, package_dir) if m not in seen and m not in IGNORED)
    return frozenset(seen)


def _module_path(name: str, package_dir: Path) -> Path | None:
    """`name` ("training", "experiments.base") as a file of the package: a module or a sub-package's __init__."""
    base = package_dir.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=256)
def _imported(path: Path, package_dir: Path) -> frozenset[str]:
    """The package modules a file imports anywhere (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found.update(m for a in node.names if (m := _inside(a.name)))
        elif isinstance(node, ast.ImportFrom) and (base := _resolve_from(node, path, package_dir)) is not None:
            if base:
                found.add(base)
            # `from sparse_distill import training`: the imported names may be modules themselves.
            found.update(f"{base}.{a.name}" if base else a.name for a in node.names)
    return frozenset(m for m in found if _module_path(m, package_dir) is not None)


def _inside(dotted: str) -> str | None:
    """`sparse_distill.x.y` -> `x.y`, the package itself -> "", anything outside it -> None."""
    if dotted == PACKAGE:
        return ""
    return dotted[len(PACKAGE) + 1 :] if dotted.startswith(PACKAGE + ".") else None


def _resolve_from(node: ast.ImportFrom, path: Path, package_dir: Path) -> str | None:
    """The package-relative module of a `from ... import` ("" for the package itself, None outside it)."""
    if node.level == 0:
        return _inside(node.module or "")
    # Relative import: climb from the file's own package.
    parts = list(path.relative_to(package_dir).with_suffix("").parts[:-1])
    parts = parts[: len(parts) - (node.level - 1)]
    if node.module:
        parts += node.module.split(".")
    return ".".join(parts)


def _dump(node: ast.AST) -> str:
    """A syntax tree as text, without positions (comments are never in it)."""
    return ast.dump(node, annotate_fields=False, include_attributes=False)


@lru_cache(maxsize=256)
def _module_dump(path: Path | None) -> str:
    """A whole module's tree as text."""
    return _dump(_tree(path))


# Each file is parsed once per process (the keys of several stages share modules); callers never modify the tree.
@lru_cache(maxsize=256)
def _tree(path: Path | None) -> ast.Module:
    """The module's syntax tree without docstrings."""
    assert path is not None
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree
