"""A student folder's shape and file names, readable without torch (see `numpy_student` and `student`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sparse_distill.data import DataError

STUDENT_WEIGHTS = "student.safetensors"
STUDENT_CONFIG = "student.json"
LABEL_MAP = "label_map.json"
TABLE_DTYPES = ("float32", "float16", "int8")


@dataclass(frozen=True)
class DanConfig:
    """Shape of a DAN student."""

    vocab_size: int
    num_classes: int
    dim: int = 100
    hidden: int = 256
    pooling: Literal["mean", "max", "sum"] = "mean"
    # Dense hidden layers between the pooled vector and the output (the paper's DAN has one).
    layers: int = 1
    dropout: float = 0.0
    init_std: float = 0.1
    # How the n-gram table is stored: training always uses float32; `quantize_student` writes the smaller forms.
    table_dtype: Literal["float32", "float16", "int8"] = "float32"
    # Independent DANs in one model: each pools its own dim / members columns of the table and has its own dense
    # layers; the output is the mean of their probabilities (an ensemble at the cost of one table).
    members: int = 1


def read_dan_config(model_dir: str | Path) -> DanConfig:
    """The shape of the student in a model folder; a missing or unreadable folder is a clear error."""
    model_dir = Path(model_dir)
    if not (model_dir / STUDENT_WEIGHTS).exists():
        raise FileNotFoundError(f"{model_dir}: not a student model folder (no {STUDENT_WEIGHTS})")
    try:
        return DanConfig(**json.loads((model_dir / STUDENT_CONFIG).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{model_dir / STUDENT_CONFIG}: not a readable student config ({e})") from e
