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


# Storage variants of one model (a name's last word): same colour as the model, their own marker.
VARIANT_MARKERS = {"float32": "o", "float16": "s", "int8": "^"}
_OTHER_MARKERS = "DvP*Xph"


def _group_and_variant(point: dict[str, Any]) -> tuple[str, str]:
    """The model a point belongs to and its variant: from `group`/`variant` when given, else from a name ending in a
    storage type (`DAN d=100 int8` -> `DAN d=100`, `int8`); other points are their own group, variant float32."""
    name = str(point["name"])
    if "group" in point:
        return str(point["group"]), str(point.get("variant", "float32"))
    head, _, last = name.rpartition(" ")
    if head and last in VARIANT_MARKERS:
        return head, last
    return name, "float32"


def plot_accuracy_vs_speed(points: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy against inference throughput (docs/s, log-scale x axis): one marker per model, read off a legend.

    Like Figure 1 of the Sparse Distillation paper: faster models to the right, more accurate ones higher up. Each point
    is a dict with `name`, `accuracy` (fraction or percent, plotted as given) and `docs_per_s` (> 0); optionally `group`
    and `variant`. Variants of one model (e.g. its float16 and int8 tables) share its colour and differ by marker, so
    points that sit close together stay apart in the legend instead of smearing their labels over each other.
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
    keys = [_group_and_variant(p) for p in points]
    groups = list(dict.fromkeys(g for g, _ in keys))
    variants = list(dict.fromkeys(v for _, v in keys))
    extra = iter(_OTHER_MARKERS)
    markers = {v: VARIANT_MARKERS.get(v) or next(extra, "o") for v in variants}
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for k, (group, variant) in enumerate(keys):
        ax.scatter(
            xs[k],
            ys[k],
            s=70,
            marker=markers[variant],
            color=colors(groups.index(group) % 10),
            zorder=3,
            edgecolors="black",
            linewidths=0.5,
        )
    # One legend entry per model (its colour) and, when there are several, one per variant (its marker).
    handles = [
        ax.scatter([], [], s=70, marker="o", color=colors(i % 10), edgecolors="black", linewidths=0.5, label=g)
        for i, g in enumerate(groups)
    ]
    if len(variants) > 1:
        handles += [
            ax.scatter([], [], s=70, marker=markers[v], color="white", edgecolors="black", linewidths=0.8, label=v)
            for v in variants
        ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    ax.set_xscale("log")
    ax.set_xlim(xs.min() / 2.0, xs.max() * 2.0)
    span = max(float(ys.max() - ys.min()), 0.02 * max(abs(float(ys.max())), 1e-9))
    ax.set_ylim(ys.min() - 0.15 * span, ys.max() + 0.15 * span)
    ax.set_xlabel("inference speed (docs/s, log scale)")
    ax.set_ylabel("accuracy")
    ax.grid(True, which="major", linestyle=":", alpha=0.6)
    ax.set_title(title or "Accuracy vs. inference speed")
    return _save_atomic(fig, path)
