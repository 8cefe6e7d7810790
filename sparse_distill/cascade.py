"""The student/teacher cascade: the student answers the texts it is confident about, the teacher the rest.

Confidence is the student's own: its top class probability (`max_prob`) or the gap between its top two (`margin`).
A text whose confidence is at least the threshold keeps the student's answer; the others are deferred to the teacher.
Threshold 0 is the student alone; a threshold above every confidence is the teacher alone (after the student ran).

`cascade_curve` shows, from both models' probabilities on labelled texts and their measured seconds per document,
what each threshold costs and buys; `pick_threshold` reads the fastest one that reaches an accuracy target off it;
`CascadePredictor` runs the cascade on raw texts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from sparse_distill.data import LabelMap
from sparse_distill.inference import StudentPredictor
from sparse_distill.student import LABEL_MAP
from sparse_distill.teacher import TeacherPredictor, training_info

logger = logging.getLogger(__name__)

Metric = Literal["max_prob", "margin"]
METRICS: tuple[str, ...] = ("max_prob", "margin")
# Teachers fine-tuned before training_info.json recorded max_length: TeacherConfig's default, which
# the pipeline also labels and evaluates with unless the config says otherwise.
DEFAULT_TEACHER_MAX_LENGTH = 128
# Percentiles of the confidences tried by default (0, 1, ..., 100): about a hundred points on the curve.
_DEFAULT_QUANTILES = np.linspace(0.0, 1.0, 101)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown confidence metric {metric!r} (one of {', '.join(METRICS)})")


def confidence(probs: np.ndarray, metric: Metric = "max_prob") -> np.ndarray:
    """The student's confidence in each row of `probs` (shape (n, num_classes)), as float64 of shape (n,).

    `max_prob`: the top probability. `margin`: the top probability minus the second (the top one with one class).
    """
    _check_metric(metric)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"probs must have shape (n, num_classes); got {probs.shape}")
    if metric == "max_prob" or probs.shape[1] == 1:
        return probs.max(axis=1)
    # np.partition puts the two largest in the last two columns, the largest last: cheaper than a full sort.
    top2 = np.partition(probs, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def default_thresholds(conf: np.ndarray) -> list[float]:
    """0, the distinct percentiles of `conf`, and a value just above its maximum: student only to teacher only.

    The percentiles are confidences that occur (not interpolated), so each one is a real cut between documents.
    """
    conf = np.asarray(conf, dtype=np.float64)
    if conf.size == 0:
        return [0.0]
    points = np.quantile(conf, _DEFAULT_QUANTILES, method="lower")
    # Just above the largest confidence defers everything; it exceeds 1.0 when some confidence is exactly 1.
    above = float(np.nextafter(conf.max(), np.inf))
    return sorted({0.0, *(float(p) for p in points), above})


def cascade_curve(
    student_probs: np.ndarray,
    teacher_probs: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    student_seconds_per_doc: float,
    teacher_seconds_per_doc: float,
    thresholds: Sequence[float] | None = None,
    metric: Metric = "max_prob",
) -> list[dict]:
    """Accuracy and speed of the cascade at each threshold, in increasing threshold order.

    `labels`: gold class indices (0..num_classes-1, in the models' shared label order). Each row: `threshold`,
    `deferred` (share of documents sent to the teacher), `accuracy`, `docs_per_s` (the student runs on every document,
    the teacher on the deferred share: 1 / (student_s + deferred * teacher_s)) and `speedup_vs_teacher` (docs_per_s
    over the teacher's alone). `thresholds` default to `default_thresholds` of the student's confidences.
    """
    _check_metric(metric)
    student_probs = np.asarray(student_probs)
    teacher_probs = np.asarray(teacher_probs)
    gold = np.asarray(labels)
    if student_probs.ndim != 2 or student_probs.shape[0] == 0 or student_probs.shape[1] == 0:
        raise ValueError(f"student_probs must have shape (n, num_classes) with n >= 1; got {student_probs.shape}")
    if teacher_probs.shape != student_probs.shape:
        raise ValueError(
            f"teacher_probs has shape {teacher_probs.shape}, student_probs {student_probs.shape}: "
            "they must score the same documents over the same classes"
        )
    n, num_classes = student_probs.shape
    if gold.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) like the probabilities; got {gold.shape}")
    if not np.issubdtype(gold.dtype, np.integer) or gold.min() < 0 or gold.max() >= num_classes:
        raise ValueError(f"labels must be class indices in 0..{num_classes - 1}; got dtype {gold.dtype}")
    if not student_seconds_per_doc > 0 or not teacher_seconds_per_doc > 0:
        raise ValueError(
            "seconds per document must be > 0; got student "
            f"{student_seconds_per_doc!r}, teacher {teacher_seconds_per_doc!r}"
        )

    conf = confidence(student_probs, metric)
    if thresholds is None:
        thresholds = default_thresholds(conf)
    grid = sorted({float(t) for t in thresholds})
    if any(np.isnan(t) for t in grid):
        raise ValueError("thresholds must not be NaN")
    student_right = student_probs.argmax(axis=1) == gold
    teacher_right = teacher_probs.argmax(axis=1) == gold
    rows = []
    for t in grid:
        keep = conf >= t
        deferred = 1.0 - float(keep.mean())
        accuracy = float(np.where(keep, student_right, teacher_right).mean())
        seconds = student_seconds_per_doc + deferred * teacher_seconds_per_doc
        rows.append(
            {
                "threshold": t,
                "deferred": deferred,
                "accuracy": accuracy,
                "docs_per_s": 1.0 / seconds,
                "speedup_vs_teacher": teacher_seconds_per_doc / seconds,
            }
        )
    return rows


def pick_threshold(curve: Sequence[dict], target_accuracy: float) -> dict | None:
    """The fastest row of `curve` whose accuracy is at least `target_accuracy` (None when no row reaches it).

    Ties in speed go to the more accurate row, then to the lower threshold.
    """
    reaching = [row for row in curve if row["accuracy"] >= target_accuracy]
    if not reaching:
        return None
    return max(reaching, key=lambda row: (row["docs_per_s"], row["accuracy"], -row["threshold"]))


def teacher_max_length(teacher_dir: str | Path) -> int:
    """The teacher's tokens per document: `max_length` in its training_info.json if recorded, else 128.

    Not the tokenizer's model_max_length: that is the architecture's limit (512 for BERT), not what it was tuned on.
    """
    value = training_info(teacher_dir).get("max_length")
    return value if isinstance(value, int) and value > 0 else DEFAULT_TEACHER_MAX_LENGTH


def teacher_labels(teacher: TeacherPredictor) -> list | None:
    """The teacher's label values in class order, or None when its folder does not say.

    The pipeline saves a label_map.json beside the weights (the exact values, ints stay ints). Otherwise the model
    config's id2label is used (strings), unless it holds only Hugging Face's placeholders (LABEL_0, LABEL_1, ...).
    """
    path = Path(teacher.model_dir) / LABEL_MAP
    if path.exists():
        return list(LabelMap.load(path).labels)
    id2label = {int(k): str(v) for k, v in (teacher.model.config.id2label or {}).items()}
    names = [id2label.get(i, f"LABEL_{i}") for i in range(teacher.num_labels)]
    if names == [f"LABEL_{i}" for i in range(teacher.num_labels)]:
        return None
    return names


def check_same_labels(student: StudentPredictor, teacher: TeacherPredictor, student_dir: str | Path | None) -> None:
    """Raise ValueError naming both folders unless the student and the teacher share their labels in the same order.

    Their probability columns are mixed row by row, so column j must mean the same class in both.
    """
    where = f"student {student_dir or '(in memory)'} and teacher {teacher.model_dir}"
    if teacher.num_labels != student.num_classes:
        raise ValueError(
            f"{where}: the student has {student.num_classes} classes {student.labels}, "
            f"the teacher {teacher.num_labels}; a cascade needs the same classes in the same order"
        )
    known = teacher_labels(teacher)
    if known is None:
        logger.warning("%s: the teacher folder records no label names; assuming the student's order", where)
        return
    # id2label holds strings: compare the student's values as strings then (the pipeline writes str(value)).
    mine = student.labels if (Path(teacher.model_dir) / LABEL_MAP).exists() else [str(v) for v in student.labels]
    if mine != known:
        raise ValueError(
            f"{where}: the label lists differ (student {student.labels}, teacher {known}); "
            "a cascade needs the same classes in the same order"
        )


class CascadePredictor:
    """The student on every text, the teacher on those the student is not confident about.

    A text keeps the student's probabilities when `confidence(student probs, metric) >= threshold`; otherwise it gets
    the teacher's. `threshold` 0 never calls the teacher; 1 calls it on all but texts with confidence exactly 1.
    """

    def __init__(
        self,
        student: StudentPredictor,
        teacher: TeacherPredictor,
        threshold: float,
        metric: Metric = "max_prob",
        teacher_batch_size: int = 32,
        *,
        student_dir: str | Path | None = None,
    ) -> None:
        """`student_dir`: where the student came from, only to name it in errors."""
        _check_metric(metric)
        if not 0.0 <= threshold <= 1.0:  # also rejects NaN
            raise ValueError(f"threshold must be in [0, 1]; got {threshold!r}")
        if teacher_batch_size < 1:
            raise ValueError(f"teacher_batch_size must be >= 1, got {teacher_batch_size}")
        check_same_labels(student, teacher, student_dir)
        self.student = student
        self.teacher = teacher
        self.threshold = float(threshold)
        self.metric: Metric = metric
        self.teacher_batch_size = teacher_batch_size

    @classmethod
    def load(
        cls,
        student_dir: str | Path,
        teacher_dir: str | Path,
        threshold: float,
        metric: Metric = "max_prob",
        threads: int = 1,
        max_length: int | None = None,
    ) -> CascadePredictor:
        """Load both models from their folders. `max_length` (teacher tokens per text) defaults to
        `teacher_max_length(teacher_dir)`; `threads` is the student's."""
        # Cheap checks first: loading a teacher takes seconds.
        _check_metric(metric)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1]; got {threshold!r}")
        student = StudentPredictor.load(student_dir, threads=threads)
        teacher = TeacherPredictor(teacher_dir, max_length=max_length or teacher_max_length(teacher_dir))
        return cls(student, teacher, threshold, metric, student_dir=student_dir)

    @property
    def labels(self) -> list:
        return self.student.labels

    @property
    def label_map(self) -> LabelMap:
        return self.student.label_map

    @property
    def num_classes(self) -> int:
        return self.student.num_classes

    def predict_with_route(self, texts: list[str], batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (shape (len(texts), num_classes)) and, per text, whether the teacher answered it."""
        probs = self.student.predict_proba(texts, batch_size)
        deferred = confidence(probs, self.metric) < self.threshold
        if deferred.any():
            # Only the deferred texts reach the teacher: that is the whole saving.
            hard = [texts[i] for i in np.flatnonzero(deferred)]
            probs[deferred] = self.teacher.predict_proba(hard, self.teacher_batch_size)
        logger.debug("cascade: %d of %d texts deferred to the teacher", int(deferred.sum()), len(texts))
        return probs, deferred

    def predict_proba(self, texts: list[str], batch_size: int = 1024) -> np.ndarray:
        """Class probabilities, shape (len(texts), num_classes): the student's or, where deferred, the teacher's."""
        return self.predict_with_route(texts, batch_size)[0]

    def predict(self, texts: list[str], batch_size: int = 1024) -> list:
        """Predicted label values (as in the train set's label column)."""
        return [self.label_map.decode(int(i)) for i in self.predict_proba(texts, batch_size).argmax(axis=1)]
