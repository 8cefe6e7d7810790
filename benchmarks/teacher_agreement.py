"""Where a finished run's students part from their teacher: agreement with the teacher's class on the texts they were
distilled on (train rows, transfer set, corpus) against the dev texts they never saw, and which dev texts the
student loses.

A student that agrees with its teacher on nearly every training text but much less on dev is limited by what its
training texts cover, not by its fit; more steps, width or depth will not close that gap, more varied texts can. The
dev texts the teacher gets right and the student wrong are listed, with the share that match `--pattern` (by default
English negation and contrast words: what a bag of n-grams cannot scope) against that share over all of dev.

    python benchmarks/teacher_agreement.py runs/bench-quality/sst2
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTRAST = r"\b(not|n't|no|never|nothing|without|but|yet|though|although|however|despite)\b"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="A finished pipeline run (runs/<name>).")
    p.add_argument("--sample", type=int, default=50_000, help="At most this many texts per labelling folder.")
    p.add_argument("--pattern", default=CONTRAST, help="Regex for the dev texts to count among the student's losses.")
    p.add_argument("--show", type=int, default=10, help="Dev texts lost to the teacher to print per student.")
    p.add_argument("--out", type=Path, help="JSON file for the figures (default: benchmarks/results/...).")
    args = p.parse_args()

    from sparse_distill.config import load_config
    from sparse_distill.inference import StudentPredictor
    from sparse_distill.pipeline import load_task_data
    from sparse_distill.run_store import stage_dir
    from sparse_distill.soft_labels import iter_soft_labels
    from sparse_distill.teacher import TeacherPredictor

    run = args.run_dir
    cfg = load_config(run / "config.yaml")
    data = load_task_data(cfg.data)
    dev_texts, dev_gold = data.dev.texts, np.asarray(data.encoded(data.dev))
    teacher = TeacherPredictor(stage_dir(run, "teacher") / "model", max_length=cfg.teacher.max_length)
    teacher_dev = teacher.predict_proba(dev_texts).argmax(1)
    # The teacher's classes on the texts the students were distilled on, sampled evenly from each labelling folder.
    seen: dict[str, tuple[list[str], np.ndarray]] = {}
    for stage in ("label_train", "label_transfer", "label_corpus"):
        folder = stage_dir(run, stage)
        if not (folder / "manifest.json").exists():
            continue
        # Shard by shard, with each shard's ids checked against its source rows.
        shards = list(iter_soft_labels(folder))
        texts = [t for shard_texts, _ in shards for t in shard_texts]
        probs = np.concatenate([p for _, p in shards])
        pick = np.linspace(0, len(texts) - 1, min(args.sample, len(texts))).astype(int)
        seen[folder.name] = ([texts[i] for i in pick], probs[pick].argmax(1))

    pattern = re.compile(args.pattern)
    matches = np.array([bool(pattern.search(t.lower())) for t in dev_texts])
    report: dict = {"run": run.name, "teacher_dev": float((teacher_dev == dev_gold).mean()), "students": {}}
    for name, stage in (("scratch", "scratch"), ("kd", "distill"), ("kdft", "kdft")):
        model_dir = stage_dir(run, stage) / "model"
        if not model_dir.exists():
            continue
        student = StudentPredictor.load(model_dir)
        dev = student.predict_proba(dev_texts).argmax(1)
        lost = (teacher_dev == dev_gold) & (dev != dev_gold)
        row = {f"agree_{k}": float((student.predict_proba(t).argmax(1) == c).mean()) for k, (t, c) in seen.items()}
        row |= {
            "agree_dev": float((dev == teacher_dev).mean()),
            "dev_accuracy": float((dev == dev_gold).mean()),
            "lost_to_teacher": int(lost.sum()),
            "won_from_teacher": int(((teacher_dev != dev_gold) & (dev == dev_gold)).sum()),
            "pattern_share_dev": float(matches.mean()),
            "pattern_share_lost": float(matches[lost].mean()) if lost.any() else None,
        }
        report["students"][name] = row
        print(name, json.dumps(row))
        for t in np.array(dev_texts, dtype=object)[lost][: args.show]:
            print("   lost:", t[:160])
    out = args.out or ROOT / "benchmarks" / "results" / f"teacher_agreement_{run.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
