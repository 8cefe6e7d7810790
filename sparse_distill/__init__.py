"""Sparse Distillation: distil a transformer text classifier into a fast n-gram Deep Averaging Network.

The public API (`load_student`, `Student`, `Prediction`, `Explanation`, `explain_text`, `top_ngrams`) is imported on
first use, so `import sparse_distill` stays cheap (no torch, MLflow or Prefect until a model is loaded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it (imported lazily by `__getattr__`).
_PUBLIC = {
    "load_student": "sparse_distill.api",
    "Student": "sparse_distill.api",
    "Prediction": "sparse_distill.api",
    "Explanation": "sparse_distill.explanation",
    "NgramEffect": "sparse_distill.explanation",
    "explain_text": "sparse_distill.explanation",
    "top_ngrams": "sparse_distill.explanation",
}
__all__ = [
    "Explanation",
    "NgramEffect",
    "Prediction",
    "Student",
    "__version__",
    "explain_text",
    "load_student",
    "top_ngrams",
]

if TYPE_CHECKING:
    from sparse_distill.api import Prediction, Student, load_student
    from sparse_distill.explanation import Explanation, NgramEffect, explain_text, top_ngrams


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'sparse_distill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
