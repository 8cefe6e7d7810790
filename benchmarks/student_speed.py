"""Where a student's inference time goes, from raw text: tokenising, word lookup, n-gram hashing and lookup,
the embedding gather and pooling, and the dense layers; and how far the gather is from the memory-bandwidth bound.

Speed only: the table is random (a trained table of the same shape costs the same), so no accuracy is reported.

    python benchmarks/student_speed.py --vocab data/bench-vocab/imdb-75k/ours --dims 100 1000 \\
        --texts ../shared/data/imdb/test.parquet --docs 2000
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

from sparse_distill.student import DanConfig, DanStudent  # noqa: E402
from sparse_distill.vocab import NgramVocab, _non_word_pattern, _split_tokens  # noqa: E402


def best_of(fn, repeat: int = 3) -> float:
    """The fastest of `repeat` runs, in seconds (the least disturbed by the machine's other work)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth_gbs(mb: int = 1024) -> float:
    """Memory bandwidth as a large numpy copy sees it (read + write), GB/s."""
    src = np.ones(mb * 2**20 // 8)
    dst = np.empty_like(src)
    seconds = best_of(lambda: np.copyto(dst, src))
    return 2 * src.nbytes / seconds / 1e9


def breakdown(vocab: NgramVocab, model: DanStudent, texts: list[str], batch: int) -> dict:
    """Seconds per stage over all texts in batches of `batch`."""
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    split = best_of(lambda: [_split_tokens(b) for b in batches])
    tokens = [_split_tokens(b)[0] for b in batches]
    words = best_of(lambda: [vocab._word_ids(t) for t in tokens])
    featurize = best_of(lambda: [vocab.featurize(b) for b in batches])
    feats = [tuple(map(torch.from_numpy, vocab.featurize(b))) for b in batches]
    with torch.inference_mode():
        gather = best_of(lambda: [model.embedding(i, o) for i, o in feats])
        pooled = [model.embedding(i, o) for i, o in feats]
        dense = best_of(lambda: [model.fc2(torch.relu(model.fc1(p))) for p in pooled])
        total = best_of(lambda: [model(*map(torch.from_numpy, vocab.featurize(b))) for b in batches])
    ids = sum(len(i) for i, _ in feats)
    return {
        "batch": batch,
        "docs_per_s": round(len(texts) / total, 1),
        "seconds": {
            "tokenise": round(split, 4),
            "word_lookup": round(words, 4),
            "ngram_hash_and_lookup": round(featurize - split - words, 4),
            "gather_and_pool": round(gather, 4),
            "dense": round(dense, 4),
            "total": round(total, 4),
        },
        "ids_per_doc": round(ids / len(texts), 1),
        "gathered_bytes": ids * model.config.dim * 4,
    }


def latency(vocab: NgramVocab, model: DanStudent, texts: list[str]) -> dict:
    """p50 / p99 of one text at a time, milliseconds."""
    times = []
    with torch.inference_mode():
        for text in texts:
            start = time.perf_counter()
            ids, offsets = vocab.featurize([text])
            model(torch.from_numpy(ids), torch.from_numpy(offsets))
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
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/student_speed.json"))
    a = p.parse_args()

    _non_word_pattern()  # built once per process
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
        for threads in a.threads:
            torch.set_num_threads(threads)
            runs = [breakdown(vocab, model, texts, b) for b in (32, 1024)]
            for r in runs:
                # The gather reads each id's row once: its floor is those bytes at the copy bandwidth.
                floor = r["gathered_bytes"] / (bandwidth * 1e9)
                r["gather_vs_bandwidth_floor"] = round(r["seconds"]["gather_and_pool"] / floor, 1)
            row = {"dim": dim, "threads": threads, "runs": runs, **latency(vocab, model, texts[:300])}
            print(json.dumps(row), flush=True)
            results["students"].append(row)
        del model
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
