"""Peak memory of `sparse-distill label` as the corpus grows: a tiny random teacher over synthetic corpora.

Each size runs in a fresh process (the real CLI, in-process), which reports its own peak RSS.

    python benchmarks/label_memory.py --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def tiny_teacher(out: Path) -> Path:
    """A random 1-layer BERT with a WordPiece tokenizer trained on synthetic words: no download."""
    from sparse_distill.testing import make_tiny_teacher

    if (out / "config.json").exists():
        return out
    return make_tiny_teacher(out, [f"w{i}" for i in range(5000)], vocab_size=1000)


def one(teacher: str, corpus: str, out: str) -> None:
    """Run the CLI in this process and print its peak RSS as JSON."""
    from flows.cli import main

    start = time.perf_counter()
    rc = main(
        [
            "label",
            "--teacher",
            teacher,
            "--corpus",
            corpus,
            "--out",
            out,
            "--shard-size",
            "10000",
            "--max-length",
            "32",
            "--batch-size",
            "512",
            "--no-tracking",
        ]
    )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rc": rc, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--work", default=str(ROOT / "data/synthetic"), help="Where corpora and labels are written.")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/label_memory.json"))
    p.add_argument("--one", nargs=3, metavar=("TEACHER", "CORPUS", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        one(*a.one)
        return
    from make_synthetic_corpus import make_corpus

    work = Path(a.work)
    teacher = tiny_teacher(work / "tiny-teacher")
    results = []
    for n in a.sizes:
        corpus = work / f"corpus-{n}.parquet"
        if not corpus.exists():
            make_corpus(corpus, n)
        out = work / f"labels-{n}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--one", str(teacher), str(corpus), str(out)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update(docs=n, docs_per_s=n / r["seconds"])
        results.append(r)
        print(
            f"{n:>10,} docs: peak RSS {r['peak_rss_mb']:7.0f} MB, {r['seconds']:6.0f} s, {r['docs_per_s']:8.0f} docs/s"
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
