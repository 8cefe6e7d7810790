"""How a finished run's teacher reads long texts: its dev and test accuracy with each cut (`teacher.truncation`),
and how many texts pass its token budget at all.

`head` keeps the first `teacher.max_length` tokens of a text; `head_tail` the first half and the last half of that
budget. A teacher fine-tuned with one cut can be scored with the other: the figures say what the cut alone is worth.

    python benchmarks/teacher_truncation.py runs/bench-quality/imdb-ratings-4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CUTS = ("head", "head_tail")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="A finished pipeline run (runs/<name>).")
    p.add_argument("--splits", nargs="+", default=["dev", "test"], help="Labelled splits to score.")
    p.add_argument("--out", type=Path, help="JSON file for the figures (default: benchmarks/results/...).")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from sparse_distill.config import load_config
    from sparse_distill.pipeline import load_task_data
    from sparse_distill.run_store import stage_dir
    from sparse_distill.teacher import TeacherPredictor, teacher_truncation, tokenize

    run = args.run_dir
    cfg = load_config(run / "config.yaml")
    data = load_task_data(cfg.data)
    model_dir = stage_dir(run, "teacher") / "model"
    budget = cfg.teacher.max_length
    result: dict = {"run": str(run), "max_length": budget, "trained_with": teacher_truncation(model_dir)}
    for split in args.splits:
        texts, gold = getattr(data, split).texts, np.asarray(data.encoded(getattr(data, split)))
        whole = tokenize(AutoTokenizer.from_pretrained(str(model_dir)), texts, 10**9)["input_ids"]
        row = {"texts": len(texts), "over_budget": int(sum(len(ids) > budget for ids in whole))}
        for cut in CUTS:
            start = time.perf_counter()
            teacher = TeacherPredictor(model_dir, max_length=budget, truncation=cut)
            row[cut] = float((teacher.predict_logits(texts).argmax(1) == gold).mean())
            print(f"{split} {cut}: accuracy {row[cut]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        result[split] = row
        print(f"{split}: {row['over_budget']:,} of {len(texts):,} texts over {budget} tokens", flush=True)
    out = args.out or ROOT / "benchmarks" / "results" / f"teacher_truncation_{run.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
