"""An experiment's rows as a markdown table and as an accuracy-vs-speed plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: Any, key: str = "") -> str:
    if key in ("docs_per_s", "speedup_vs_teacher") and isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:,.0f}" if value >= 100 else f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")  # a pipe would end the markdown cell


_COLUMNS = {
    "cascade": [
        ("threshold", "threshold"),
        ("deferred", "sent to teacher"),
        ("accuracy", "accuracy"),
        ("docs_per_s", "docs/s"),
        ("speedup_vs_teacher", "x teacher"),
        ("chosen", "chosen on dev"),
    ],
    "wos": [
        ("task", "task"),
        ("docs", "dev docs"),
        ("teacher_accuracy", "teacher acc"),
        ("teacher_accuracy_shuffled", "teacher acc, shuffled"),
        ("p", "p (kept correct)"),
        ("wos", "WOS"),
        ("prediction", "prediction"),
        ("student_retention", "measured DAN retention"),
    ],
}


def markdown_table(name: str, rows: list[dict[str, Any]], task: str, eval_name: str, info: dict[str, Any]) -> str:
    """The experiment's rows as a markdown table, with a line saying what was measured."""
    cols = _COLUMNS.get(name)
    if cols is None:
        keys = ["ablation", "model", "accuracy", "dev_accuracy", "params", "docs_per_s"]
        extra = [k for r in rows for k in r if k not in keys and k not in ("V", "d")]
        keys += list(dict.fromkeys(extra))
        present = [k for k in keys if any(k in r for r in rows)]
        titles = {"accuracy": f"{eval_name} acc", "dev_accuracy": "dev acc", "docs_per_s": "docs/s (1 thread)"}
        cols = [(k, titles.get(k, k.replace("_", " "))) for k in present]
    lines = [
        f"**{name}** on {task} ({eval_name} split)",
        "",
        "| " + " | ".join(t for _, t in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), k) for k, _ in cols) + " |")
    if name == "cascade":
        if info.get("threshold") is None:
            lines.append(f"\nNo threshold reaches the target accuracy {info['target_accuracy']:.4f} on dev.")
        else:
            lines.append(
                f"\nTarget accuracy {info['target_accuracy']:.4f} (dev): threshold {info['threshold']:.4f} on "
                f"{info['metric']}; student {1 / info['student_s_per_doc']:,.0f} docs/s, teacher "
                f"{1 / info['teacher_s_per_doc']:,.1f} docs/s (batch 32, 1 thread)."
            )
    return "\n".join(lines)


def plot_results(name: str, rows: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """The rows that have an accuracy and a speed, plotted as accuracy vs. docs/s; returns the PNG paths written."""
    from sparse_distill.plots import plot_accuracy_vs_speed

    points = [
        {"name": r.get("model") or f"T={r['threshold']:.3f}", "accuracy": r["accuracy"], "docs_per_s": r["docs_per_s"]}
        for r in rows
        if r.get("docs_per_s") and r.get("accuracy") is not None and ("model" in r or "threshold" in r)
    ]
    if not points:
        return []
    return [str(plot_accuracy_vs_speed(points, out_dir / "accuracy_vs_speed.png", title=f"{name}"))]
