"""Where a student's inference time goes, from raw text: tokenising, word lookup, n-gram hashing and lookup,
the embedding gather and pooling, and the dense layers; and how far the gather is from the memory-bandwidth bound.

Speed only: the table is random (a trained table of the same shape costs the same), so no accuracy is reported.

    python benchmarks/student_speed.py --vocab data/bench-vocab/imdb-75k/ours --dims 100 1000 \\
        --texts ../shared/data/imdb/test.parquet --docs 2000

Trained students, threads, the teacher and fastText: benchmarks/inference_bench.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

from inference_bench import breakdown, copy_bandwidth_gbs  # noqa: E402

from sparse_distill.data import LabelMap  # noqa: E402
from sparse_distill.inference import StudentPredictor  # noqa: E402
from sparse_distill.student import DanConfig, DanStudent  # noqa: E402
from sparse_distill.vocab import NgramVocab  # noqa: E402


def run_breakdown(vocab: NgramVocab, model: DanStudent, texts: list[str], batch: int, bandwidth: float) -> dict:
    """Where the time goes at one batch size (see inference_bench.breakdown)."""
    return breakdown(StudentPredictor(model, vocab, LabelMap.from_values([0, 1])), texts, batch, bandwidth)


def latency(vocab: NgramVocab, model: DanStudent, texts: list[str]) -> dict:
    """p50 / p99 of one text at a time, milliseconds."""
    times = []
    predictor = StudentPredictor(model, vocab, LabelMap.from_values([0, 1]))
    for text in texts:
        start = time.perf_counter()
        predictor.predict_one(text)
        times.append(time.perf_counter() - start)
    return {
        "p50_ms": round(1e3 * float(np.percentile(times, 50)), 3),
        "p99_ms": round(1e3 * float(np.percentile(times, 99)), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", required=True, help="A vocabulary folder (vocab.parquet), e.g. from sparse-distill vocab")
    p.add_argument("--dims", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--texts", default=str(ROOT.parent / "shared/data/imdb/test.parquet"))
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/student_speed.json"))
    a = p.parse_args()

    start = time.perf_counter()
    vocab = NgramVocab.load(a.vocab)
    load_s = time.perf_counter() - start
    texts = pq.read_table(a.texts, columns=["text"]).column("text").to_pylist()[: a.docs]
    bandwidth = copy_bandwidth_gbs()
    results = {
        "vocab": a.vocab,
        "vocab_size": len(vocab),
        "vocab_load_s": round(load_s, 3),
        "docs": len(texts),
        "copy_bandwidth_gbs": round(bandwidth, 1),
        "students": [],
    }
    for dim in a.dims:
        torch.manual_seed(0)
        model = DanStudent(DanConfig(vocab_size=len(vocab), num_classes=2, dim=dim)).eval()
        # One thread: the breakdown times each step on its own (inference_bench.py measures threads end to end).
        runs = [run_breakdown(vocab, model, texts, b, bandwidth) for b in (32, 1024)]
        row = {"dim": dim, "threads": 1, "runs": runs, **latency(vocab, model, texts[:300])}
        print(json.dumps(row), flush=True)
        results["students"].append(row)
        del model
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
