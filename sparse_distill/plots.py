"""Report figures (matplotlib, Agg backend, no GUI): confusion matrix and accuracy vs. inference speed.

Every figure is written atomically (`data.atomic_path`): rendered to a temporary sibling, then renamed into place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sparse_distill.data import atomic_path  # noqa: E402

logger = logging.getLogger(__name__)


def _save_atomic(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write `fig` as PNG to `path` through the atomic writer; close the figure."""
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    logger.info("wrote %s", path)
    return path


def plot_confusion_matrix(
    matrix: Sequence[Sequence[float]] | np.ndarray, labels: Sequence[Any], path: str | Path, title: str = ""
) -> Path:
    """Confusion matrix (rows: gold, columns: predicted) as a heat map with counts and row-normalised shading."""
    counts = np.asarray(matrix, dtype=np.float64)
    n = len(labels)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match {n} labels")
    row_sums = counts.sum(axis=1, keepdims=True)
    shade = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)
    size = max(4.0, 0.6 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(shade, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of gold row")
    names = [str(v) for v in labels]
    ax.set_xticks(range(n), names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if title:
        ax.set_title(title)
    if n <= 30:
        integral = np.allclose(counts, np.round(counts))
        for i in range(n):
            for j in range(n):
                text = f"{int(round(counts[i, j]))}" if integral else f"{counts[i, j]:.3g}"
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=8, color="white" if shade[i, j] > 0.5 else "black"
                )
    return _save_atomic(fig, path)


def plot_accuracy_vs_speed(points: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy against inference throughput (docs/s, log-scale x axis), one labelled point per model.

    Like Figure 1 of the Sparse Distillation paper: faster models to the right, more accurate ones higher up. Each point
    is a dict with `name`, `accuracy` (fraction or percent, plotted as given) and `docs_per_s` (> 0).
    """
    if not points:
        raise ValueError("no points to plot")
    for p in points:
        missing = {"name", "accuracy", "docs_per_s"} - p.keys()
        if missing:
            raise ValueError(f"point {p!r} lacks {sorted(missing)}")
        if not float(p["docs_per_s"]) > 0:
            raise ValueError(f"point {p['name']!r}: docs_per_s must be > 0 for a log scale, got {p['docs_per_s']!r}")
    xs = np.array([float(p["docs_per_s"]) for p in points])
    ys = np.array([float(p["accuracy"]) for p in points])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.get_cmap("tab10")
    for k, p in enumerate(points):
        ax.scatter(xs[k], ys[k], s=60, color=colors(k % 10), zorder=3, edgecolors="black", linewidths=0.5)
        ax.annotate(str(p["name"]), (xs[k], ys[k]), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.set_xscale("log")
    # Pad the log-scale range so labels fit, and the accuracy range so points do not sit on the frame.
    ax.set_xlim(xs.min() / 2.5, xs.max() * 8.0)
    span = max(float(ys.max() - ys.min()), 0.02 * max(abs(float(ys.max())), 1e-9))
    ax.set_ylim(ys.min() - 0.15 * span, ys.max() + 0.25 * span)
    ax.set_xlabel("inference speed (docs/s, log scale)")
    ax.set_ylabel("accuracy")
    ax.grid(True, which="major", linestyle=":", alpha=0.6)
    ax.set_title(title or "Accuracy vs. inference speed")
    return _save_atomic(fig, path)
