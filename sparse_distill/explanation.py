"""Why the student decided: the n-grams of one text that carry its prediction, and the n-grams of a model that
speak for each class on their own.

A DAN pools the rows of a document's n-grams, then runs small dense layers. Removing one n-gram (all its
occurrences) from a document therefore changes only the pooled vector, which can be recomputed without re-reading the
text:
- mean pooling: (S - c_g * e_g) / (N - c_g), with S the sum of the N rows and c_g the n-gram's count;
- sum pooling: S - c_g * e_g;
- max pooling: per dimension, the largest value among the other n-grams (the top two values per dimension suffice).
All three are exact: the effect reported is the model's own probability with and without the n-gram, computed for
every n-gram of the text in one batch through the dense layers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from sparse_distill.inference import StudentPredictor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NgramEffect:
    """One n-gram of a text: how often it occurs and how much the predicted class's probability drops without it
    (`effect` > 0: it supports the prediction; < 0: it argues against it)."""

    ngram: str
    count: int
    effect: float


@dataclass(frozen=True)
class Explanation:
    """The prediction for one text and the n-grams that moved it most (largest |effect| first)."""

    text: str
    label: Any
    probability: float
    probabilities: dict[str, float]
    ngrams: list[NgramEffect] = field(default_factory=list)
    pooling: str = "mean"
    # How many distinct known n-grams the text has (`ngrams` holds the top of them).
    known_ngrams: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    def to_markdown(self) -> str:
        """A small markdown table: n-gram, count, effect on the predicted class's probability."""
        lines = [
            f"**{self.label}** ({self.probability:.3f}): {self.text[:200]!r}",
            "",
            "| n-gram | count | effect on p |",
            "|---|---|---|",
        ]
        lines += [f"| `{g.ngram}` | {g.count} | {g.effect:+.4f} |" for g in self.ngrams]
        if not self.ngrams:
            lines.append("| (no known n-gram) | | |")
        return "\n".join(lines)


def _pooled_without_each(rows: torch.Tensor, counts: torch.Tensor, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The document's pooled vector (1, dim) and, for each distinct n-gram i, the pooled vector without it (U, dim).

    `rows`: each distinct n-gram's table row (U, dim); `counts`: its occurrences (U,)."""
    import torch

    weighted = rows * counts[:, None]
    total = weighted.sum(0, keepdim=True)
    if pooling == "sum":
        return total, total - weighted
    if pooling == "mean":
        n = counts.sum()
        rest = (n - counts).clamp(min=1)[:, None]  # a text of one n-gram pools to zeros without it, as an empty bag
        return total / n, (total - weighted) / rest
    if pooling == "max":
        full = rows.max(0, keepdim=True).values
        if len(rows) == 1:
            return full, torch.zeros_like(rows)
        top2 = rows.topk(2, dim=0)
        # Without row i, a dimension's max is the second largest where row i held the largest, else the largest.
        is_top = torch.arange(len(rows))[:, None] == top2.indices[0][None, :]
        return full, torch.where(is_top, top2.values[1][None, :], top2.values[0][None, :])
    raise ValueError(f"unknown pooling {pooling!r}")


def explain_text(predictor: StudentPredictor, text: str, top: int = 10) -> Explanation:
    """The prediction for `text` and its `top` n-grams by how much removing them changes the predicted class's
    probability (exact: see the module docstring)."""
    import torch

    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    model = predictor.model
    labels = predictor.labels
    ids, _ = predictor.vocab.featurize([text], predictor.max_order)
    with torch.inference_mode():
        if len(ids) == 0:
            # No known n-gram: the model sees an empty bag (all zeros), nothing to take away.
            logits = model.classify(torch.zeros(1, model.config.dim))
            probs = torch.softmax(logits, 1)[0].numpy()
            best = int(probs.argmax())
            return Explanation(
                text, labels[best], float(probs[best]), _named(labels, probs), [], model.config.pooling, 0
            )
        unique, counts = np.unique(ids, return_counts=True)
        rows = model.table_rows(torch.from_numpy(unique))
        full, without = _pooled_without_each(rows, torch.from_numpy(counts).float(), model.config.pooling)
        probs_all = torch.softmax(model.classify(torch.cat([full, without])), 1).numpy()
    probs = probs_all[0]
    best = int(probs.argmax())
    effects = probs[best] - probs_all[1:, best]
    order = np.argsort(-np.abs(effects), kind="stable")[:top]
    names = predictor.vocab.row_names(text)
    found = [NgramEffect(names.get(int(unique[i]), str(unique[i])), int(counts[i]), float(effects[i])) for i in order]
    return Explanation(
        text, labels[best], float(probs[best]), _named(labels, probs), found, model.config.pooling, len(unique)
    )


def _named(labels: Sequence[Any], probs: np.ndarray) -> dict[str, float]:
    return {str(label): float(p) for label, p in zip(labels, probs, strict=True)}


def top_ngrams(
    predictor: StudentPredictor, k: int = 20, chunk_rows: int = 65_536
) -> dict[Any, list[tuple[str, float]]]:
    """For each class, the `k` n-grams that score highest for it on their own: each table row fed alone through the
    dense layers (a document holding only that n-gram), scored by the class's log-odds log(p / (1 - p)), which keeps
    ranking where probabilities saturate. The table is read `chunk_rows` rows at a time.

    Returns {label: [(ngram, log_odds), ...]} in descending order.
    """
    import torch

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    model = predictor.model
    # The n-gram rows only: a subword bucket is a hash of many character n-grams, no one thing to show.
    size, classes = min(model.config.vocab_size, len(predictor.vocab.ngrams)), model.config.num_classes
    best_scores = np.full((classes, 0), -np.inf, np.float32)
    best_rows = np.zeros((classes, 0), np.int64)
    with torch.inference_mode():
        for start in range(0, size, chunk_rows):
            rows = torch.arange(start, min(size, start + chunk_rows))
            log_p = torch.log_softmax(model.classify(model.table_rows(rows)), 1)
            # log-odds of class c: log p_c - log(1 - p_c), with 1 - p_c summed from the other classes for precision.
            scores = np.empty((classes, len(rows)), np.float32)
            for c in range(classes):
                others = torch.cat([log_p[:, :c], log_p[:, c + 1 :]], 1)
                scores[c] = (log_p[:, c] - torch.logsumexp(others, 1)).numpy()
            scores = np.concatenate([best_scores, scores], 1)
            ids = np.concatenate([best_rows, np.broadcast_to(rows.numpy(), (classes, len(rows)))], 1)
            keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            best_scores = np.take_along_axis(scores, keep, 1)
            best_rows = np.take_along_axis(ids, keep, 1)
    ngrams = predictor.vocab.ngrams
    return {
        label: [(ngrams[int(r)], float(s)) for r, s in zip(best_rows[c], best_scores[c], strict=True)]
        for c, label in enumerate(predictor.labels)
    }


def explain_errors(
    predictor: StudentPredictor,
    texts: Sequence[str],
    gold: Sequence[Any],
    sample: int = 20,
    top: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Explanations of a seeded sample of the texts the student gets wrong, each with its row and gold label:
    {"rows", "errors", "explained": [...]}."""
    if len(texts) != len(gold):
        raise ValueError(f"{len(texts)} texts but {len(gold)} gold labels")
    predicted = predictor.predict(list(texts))
    wrong = [i for i, (p, g) in enumerate(zip(predicted, gold, strict=True)) if p != g]
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(wrong, size=min(sample, len(wrong)), replace=False).tolist()) if wrong else []
    explained = [{"row": i, "gold": gold[i], **explain_text(predictor, texts[i], top).to_dict()} for i in chosen]
    logger.info("explained %d of %d errors in %d rows", len(explained), len(wrong), len(texts))
    return {"rows": len(texts), "errors": len(wrong), "explained": explained}


def write_error_explanations(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """`errors_explained.json` and `errors_explained.md` (an `explain_errors` report) in `out_dir`; both paths."""
    from sparse_distill.data import atomic_write_text

    out_dir = Path(out_dir)
    json_path = out_dir / "errors_explained.json"
    md_path = out_dir / "errors_explained.md"
    atomic_write_text(json_path, json.dumps(report, indent=2, default=str))
    records = report["explained"]
    parts = [
        f"# Dev errors, explained ({len(records)} of {report['errors']} errors in {report['rows']} rows)",
        "",
        "Effect: how much the predicted class's probability drops when the n-gram is taken out of the text.",
    ]
    for r in records:
        explanation = Explanation(
            r["text"],
            r["label"],
            r["probability"],
            r["probabilities"],
            [NgramEffect(**g) for g in r["ngrams"]],
            r["pooling"],
            r["known_ngrams"],
        )
        parts += ["", f"## row {r['row']}: gold {r['gold']}, predicted {r['label']}", "", explanation.to_markdown()]
    atomic_write_text(md_path, "\n".join(parts) + "\n")
    return [json_path, md_path]
