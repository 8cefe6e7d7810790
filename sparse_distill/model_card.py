"""Model cards: a `README.md` in every student folder saying what it is, what it was made from, how well and how
fast it does against the teacher, the from-scratch baseline and fastText (when a benchmark measured it), and how to
load it. Written when a run is published, before the model is logged, so MLflow carries the card with the model."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_distill.data import atomic_write_text

logger = logging.getLogger(__name__)

CARD = "README.md"
# A fastText measurement of the same task, in the form the quality benchmark writes (`accuracy`, and
# `docs_per_s_one_core` or `docs_per_s`): put in the run directory, it gets a row on the cards.
FASTTEXT_RESULT = "fasttext.json"


@dataclass(frozen=True)
class ModelRow:
    """One line of the card's results table."""

    name: str
    dev_accuracy: float | None
    test_accuracy: float | None = None
    docs_per_s: float | None = None
    this_model: bool = False


@dataclass
class ModelCard:
    """What a card says; `to_markdown` renders it."""

    title: str
    task: str
    labels: list[Any]
    model_dir: str
    teacher: str
    teacher_fingerprint: str | None
    # (context, name, source, digest, rows) of each dataset: see `pipeline.lineage_datasets`.
    datasets: list[tuple[str, str, str, str, int | None]]
    rows: list[ModelRow]
    params: dict[str, int]
    config_yaml: str
    pooling: str
    table_dtype: str
    # DANs averaged in the student, each on its share of the table's columns (`student.members`).
    members: int = 1
    mlflow_uris: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        size = folder_bytes(self.model_dir)
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        lines = [
            f"# {self.title}",
            "",
            "A Deep Averaging Network over word n-grams (Sparse Distillation, `sparse-distill`): raw text in, "
            "one probability per label out.",
            "",
            f"- **Task**: {self.task}",
            f"- **Labels** (in probability-column order): {', '.join(f'`{v}`' for v in self.labels)}",
            f"- **Teacher**: `{self.teacher}`"
            + (f" (fingerprint `{self.teacher_fingerprint}`)" if self.teacher_fingerprint else ""),
            f"- **Size**: {size / 2**20:.1f} MiB on disk; {self.params.get('total', 0):,} parameters "
            f"({self.params.get('sparse', 0):,} in the n-gram table, {self.params.get('dense', 0):,} dense); "
            f"{self.pooling} pooling, table stored as {self.table_dtype}"
            + (
                f"; {self.members} members (DANs on their own share of the table's columns, averaged in probability)"
                if self.members > 1
                else ""
            ),
            "",
            "## Results",
            "",
            "| model | dev accuracy | test accuracy | docs/s |",
            "|---|---|---|---|",
        ]
        for r in self.rows:
            name = f"**{r.name}** (this model)" if r.this_model else r.name
            dev, test, speed = fmt(r.dev_accuracy, ".4f"), fmt(r.test_accuracy, ".4f"), fmt(r.docs_per_s, ",.0f")
            lines.append(f"| {name} | {dev} | {test} | {speed} |")
        lines += [
            "",
            "docs/s: raw text in, probabilities out (tokenisation included), measured by the evaluate stage.",
            "",
            "## Data",
            "",
            "| split | name | rows | digest | source |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {context} | {name} | {fmt(rows, ',')} | `{digest}` | `{source}` |"
            for context, name, source, digest, rows in self.datasets
        ]
        lines += [
            "",
            "Digest: the fingerprint of the file (path, size, modification time) that the run's cache keys use.",
            "",
            "## How to load it",
            "",
            "```python",
            "from sparse_distill import load_student",
            "",
            f"student = load_student({self.model_dir!r})",
        ]
        lines += [f"# or: load_student({uri!r})" for uri in self.mlflow_uris]
        lines += [
            'student.predict(["a gorgeous, witty film"])',
            'student.explain("a gorgeous, witty film")',
            "```",
            "",
            f"Command line: `sparse-distill predict --model {self.model_dir}` (texts on stdin, one per line).",
            "",
            "## Config",
            "",
            "```yaml",
            self.config_yaml.rstrip("\n"),
            "```",
            "",
        ]
        return "\n".join(lines)


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the files in a folder (the card itself left out)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.name != CARD)


def read_fasttext_row(run_dir: str | Path) -> ModelRow | None:
    """The fastText row from `run_dir/fasttext.json`, when a benchmark put one there."""
    path = Path(run_dir) / FASTTEXT_RESULT
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
        speed = result.get("docs_per_s_one_core", result.get("docs_per_s"))
        # The benchmark names the split its `accuracy` is on (test unless the task has none).
        if result.get("test_split") == "dev":
            return ModelRow("fastText", result.get("accuracy"), None, speed)
        return ModelRow("fastText", result.get("dev_accuracy"), result.get("accuracy"), speed)
    except (OSError, ValueError, AttributeError) as e:
        logger.warning("%s: unreadable, no fastText row on the cards (%s)", path, e)
        return None


def write_model_card(card: ModelCard) -> Path:
    """Write the card as `README.md` in its model folder; returns the path."""
    path = Path(card.model_dir) / CARD
    atomic_write_text(path, card.to_markdown())
    logger.info("wrote the model card %s", path)
    return path
