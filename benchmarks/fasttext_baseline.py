"""fastText, the tool users would pick instead of a distilled student: trained on the same train labels, timed end to
end from raw text on the same test texts (`pip install -e ".[bench]"` installs the binding).

    python benchmarks/fasttext_baseline.py --data ../shared/data/imdb --name imdb
    python benchmarks/fasttext_baseline.py --data ../shared/data/sst2 --name sst2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# fastText reads one line of space-separated tokens: lowercase, one line (the run's own fastText reads the same).
from sparse_distill.baselines import fasttext_line as prepare  # noqa: E402
from sparse_distill.baselines import write_fasttext_file  # noqa: E402


def main() -> None:
    import fasttext

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Folder with train.parquet and test.parquet (text, label).")
    p.add_argument("--name", required=True)
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--word-ngrams", type=int, default=3)
    p.add_argument("--epoch", type=int, default=5)
    p.add_argument("--train-threads", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args()

    train = pq.read_table(Path(a.data) / "train.parquet").to_pydict()
    test_split = "test" if (Path(a.data) / "test.parquet").exists() else "dev"
    test = pq.read_table(Path(a.data) / f"{test_split}.parquet").to_pydict()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.txt")
        write_fasttext_file(path, train["text"], train["label"])  # shuffled: IMDB's train file is sorted by label
        start = time.perf_counter()
        model = fasttext.train_supervised(
            path, dim=a.dim, wordNgrams=a.word_ngrams, epoch=a.epoch, thread=a.train_threads, verbose=0
        )
        train_s = time.perf_counter() - start
        model.save_model(os.path.join(tmp, "model.bin"))
        size_mb = os.path.getsize(os.path.join(tmp, "model.bin")) / 2**20
    texts, gold = test["text"], [str(g) for g in test["label"]]
    # End to end from raw text, one core (fastText's predict is single-threaded); best of three.
    times = []
    for _ in range(3):
        start = time.perf_counter()
        labels, _ = model.predict([prepare(t) for t in texts])
        times.append(time.perf_counter() - start)
    pred = [lab[0].removeprefix("__label__") for lab in labels]
    accuracy = float(np.mean([p_ == g for p_, g in zip(pred, gold, strict=True)]))
    lat = []
    for t in texts[:1000]:
        start = time.perf_counter()
        model.predict([prepare(t)])  # the one-string form breaks on NumPy 2 (np.array(copy=False)) in 0.9.2
        lat.append(time.perf_counter() - start)
    result = {
        "name": a.name,
        "test_split": test_split,
        "docs": len(texts),
        "settings": {"dim": a.dim, "wordNgrams": a.word_ngrams, "epoch": a.epoch, "train_threads": a.train_threads},
        "train_seconds": round(train_s, 1),
        "accuracy": round(accuracy, 4),
        "docs_per_s_one_core": round(len(texts) / min(times), 1),
        "p50_ms": round(1e3 * float(np.percentile(lat, 50)), 3),
        "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 3),
        "model_mb": round(size_mb, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "fasttext": "fasttext-wheel 0.9.2",
    }
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"fasttext_{a.name}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
