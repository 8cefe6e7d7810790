"""The student/teacher cascade: accuracy and docs/s over thresholds of the student's confidence, the threshold
chosen on dev and reported on the eval split."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from sparse_distill.config import fingerprint
from sparse_distill.data import atomic_write, atomic_write_text
from sparse_distill.experiments.base import Context, accuracy, cached, docs_per_s, sample
from sparse_distill.inference import StudentPredictor


def run_cascade(ctx: Context) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Accuracy and docs/s of the student/teacher cascade over thresholds of the student's confidence. The threshold
    is chosen on dev (the fastest reaching the target) and reported on the eval split."""
    from sparse_distill.cascade import cascade_curve, pick_threshold

    ccfg = ctx.config.cascade
    folder = ctx.out_dir / "cascade"
    student_dir = ctx.base.student_dir
    fp = fingerprint(
        "cascade-probs",
        student_dir,
        ctx.base.teacher_dir,
        ctx.config.teacher_eval_docs,
        ctx.config.speed_docs,
        ctx.config.teacher_speed_docs,
    )
    probs_path = folder / "probs.npz"

    def run() -> dict[str, Any]:
        # Both models' probabilities on dev and on the eval sample, and their speeds: the curves follow from these.
        student = StudentPredictor.load(student_dir)
        teacher = ctx.teacher()
        dev = ctx.data.dev
        dev_idx = sample(len(dev.texts), ctx.config.teacher_eval_docs, 13)
        dev_texts = [dev.texts[i] for i in dev_idx]
        eval_texts, eval_gold = ctx.teacher_sample()
        arrays = {"dev_gold": np.asarray(ctx.data.encoded(dev))[dev_idx], "eval_gold": eval_gold}
        for split, texts in (("dev", dev_texts), ("eval", eval_texts)):
            arrays[f"{split}_student"] = student.predict_proba(texts)
            arrays[f"{split}_teacher"] = teacher.predict_proba(texts)
        atomic_write(probs_path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")
        # Seconds per document of each model at batch 32, one thread (the cascade's cost model).
        return {
            "student_s_per_doc": 1.0 / docs_per_s(student.predict_proba, eval_texts, ctx.config.speed_docs),
            "teacher_s_per_doc": 1.0
            / docs_per_s(lambda b: teacher.predict_proba(b, 32), eval_texts, ctx.config.teacher_speed_docs),
            "dev_docs": len(dev_texts),
            "eval_docs": len(eval_texts),
        }

    r = cached(folder, fp, run)
    z = np.load(probs_path)
    cost = (r["student_s_per_doc"], r["teacher_s_per_doc"])
    dev_curve = cascade_curve(z["dev_student"], z["dev_teacher"], z["dev_gold"], *cost, metric=ccfg.metric)
    eval_curve = cascade_curve(z["eval_student"], z["eval_teacher"], z["eval_gold"], *cost, metric=ccfg.metric)
    teacher_dev = accuracy(z["dev_teacher"], z["dev_gold"])
    target = ccfg.target_accuracy or ccfg.target_retention * teacher_dev
    chosen = pick_threshold(dev_curve, target)
    rows = [{**point, "chosen": False} for point in _spread(eval_curve, 9)]
    info: dict[str, Any] = {
        "target_accuracy": target,
        "teacher_dev_accuracy": teacher_dev,
        "threshold": None,
        "metric": ccfg.metric,
        "student_dir": student_dir,
        "teacher_dir": ctx.base.teacher_dir,
        "teacher_max_length": ctx.base.config.teacher.max_length,
        **r,
    }
    if chosen is not None:
        # The dev-chosen threshold applied to the eval split.
        (at,) = cascade_curve(
            z["eval_student"],
            z["eval_teacher"],
            z["eval_gold"],
            *cost,
            thresholds=[chosen["threshold"]],
            metric=ccfg.metric,
        )
        rows.append({**at, "chosen": True})
        info.update(threshold=chosen["threshold"], dev_accuracy=chosen["accuracy"], eval_point=at)
    atomic_write_text(folder / "curves.json", json.dumps({"dev": dev_curve, "eval": eval_curve}, default=float))
    return rows, info


def _spread(curve: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """About n points of a curve, evenly spread over the share deferred to the teacher (both ends included)."""
    if len(curve) <= n:
        return list(curve)
    ordered = sorted(curve, key=lambda p: p["deferred"])
    picks = {round(i * (len(ordered) - 1) / (n - 1)) for i in range(n)}
    return [ordered[i] for i in sorted(picks)]
