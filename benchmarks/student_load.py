"""Start-up of a big student: a random 1M x 1000 table (4 GB, the paper's largest shape) saved as a model folder,
then loaded and asked for one prediction in fresh processes. Weights are memory-mapped from safetensors.

    python benchmarks/student_load.py --vocab data/bench-vocab/imdb-75k/ours
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make(vocab: str, out: Path, dim: int) -> None:
    import torch

    from sparse_distill.data import LabelMap
    from sparse_distill.student import DanConfig, DanStudent, save_student
    from sparse_distill.vocab import NgramVocab

    torch.manual_seed(0)
    model = DanStudent(DanConfig(vocab_size=len(NgramVocab.load(vocab)), num_classes=2, dim=dim))
    save_student(model, LabelMap(("neg", "pos")), vocab, out)


def load_once(model_dir: str) -> None:
    """In this (fresh) process: time the imports, the load and the first prediction; print JSON."""
    import resource

    start = time.perf_counter()
    import psutil

    from sparse_distill.inference import StudentPredictor

    imported = time.perf_counter()
    predictor = StudentPredictor.load(model_dir)
    loaded = time.perf_counter()
    predictor.predict(["a wonderful film, really moving"])
    first = time.perf_counter()
    print(
        json.dumps(
            {
                "imports_s": round(imported - start, 2),
                "load_s": round(loaded - imported, 2),
                "first_prediction_ms": round(1e3 * (first - loaded), 1),
                "rss_mb": round(psutil.Process().memory_info().rss / 2**20),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", required=True)
    p.add_argument("--dim", type=int, default=1000)
    p.add_argument("--model", default="data/bench-student/dan-1m-1000")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    model = Path(a.model)
    if not (model / "student.safetensors").exists():
        make(a.vocab, model, a.dim)
    size_gb = sum(f.stat().st_size for f in model.iterdir()) / 1e9
    runs = []
    for _ in range(a.repeat):
        out = subprocess.run([sys.executable, __file__, "--load-once", str(model)], capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    result = {"model": str(model), "size_gb": round(size_gb, 2), "dim": a.dim, "runs": runs}
    (ROOT / "benchmarks/results/student_load.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--load-once":
        load_once(sys.argv[2])
    else:
        main()
