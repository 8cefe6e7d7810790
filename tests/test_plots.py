"""Report figures: PNGs written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparse_distill.plots import plot_accuracy_vs_speed, plot_confusion_matrix

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def test_confusion_matrix_png(tmp_path: Path) -> None:
    out = tmp_path / "figs" / "confusion.png"
    got = plot_confusion_matrix(np.array([[40, 3, 1], [5, 30, 2], [0, 4, 15]]), ["neg", "pos", "plot"], out, "student")
    assert Path(got) == out
    assert out.exists() and _is_png(out) and out.stat().st_size > 5_000
    assert [p.name for p in out.parent.iterdir()] == ["confusion.png"]  # no temp file left behind


def test_confusion_matrix_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not match"):
        plot_confusion_matrix([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "x.png", "bad")


def test_accuracy_vs_speed_png(tmp_path: Path) -> None:
    points = [
        {"name": "teacher (MiniLM)", "accuracy": 0.91, "docs_per_s": 180.0},
        {"name": "student DAN", "accuracy": 0.89, "docs_per_s": 45_000.0},
        {"name": "fastText", "accuracy": 0.87, "docs_per_s": 3_400.0},
    ]
    out = tmp_path / "speed.png"
    out.write_bytes(b"old")  # replaced atomically
    assert Path(plot_accuracy_vs_speed(points, out)) == out
    assert _is_png(out) and out.stat().st_size > 5_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed.png"]


def test_accuracy_vs_speed_rejects_bad_points(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_accuracy_vs_speed([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="docs_per_s"):
        plot_accuracy_vs_speed([{"name": "a", "accuracy": 0.5, "docs_per_s": 0}], tmp_path / "x.png")


def test_accuracy_vs_speed_groups_variants_in_a_legend(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from sparse_distill import plots

    points = [
        {"name": "DAN d=100", "accuracy": 0.83, "docs_per_s": 5.5e5},
        {"name": "DAN d=100 float16", "accuracy": 0.83, "docs_per_s": 5.6e5},
        {"name": "DAN d=100 int8", "accuracy": 0.83, "docs_per_s": 5.9e5},
        {"name": "teacher", "accuracy": 0.89, "docs_per_s": 400.0},
        {"name": "mine", "group": "DAN d=100", "variant": "pruned", "accuracy": 0.8, "docs_per_s": 7e5},
    ]
    assert [plots._group_and_variant(p) for p in points] == [
        ("DAN d=100", "float32"),
        ("DAN d=100", "float16"),
        ("DAN d=100", "int8"),
        ("teacher", "float32"),
        ("DAN d=100", "pruned"),
    ]
    saved: list[Figure] = []
    real_save = plots._save_atomic
    plots._save_atomic = lambda fig, path: saved.append(fig) or real_save(fig, path)
    try:
        out = plot_accuracy_vs_speed(points, tmp_path / "speed.png")
    finally:
        plots._save_atomic = real_save
    assert _is_png(out)
    ax = saved[0].axes[0]
    assert len(ax.texts) == 0  # no label written on a point
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["DAN d=100", "teacher", "float32", "float16", "int8", "pruned"]
