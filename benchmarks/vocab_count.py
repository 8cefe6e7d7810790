"""Corpus-scale counting (`sparse-distill vocab`) against scikit-learn's CountVectorizer, same settings, one run.

Each side runs in its own process; peak memory is the sampled RSS of the whole process tree (for ours: the CLI,
Prefect's temporary server and the worker processes). CountVectorizer runs on the first N documents for each N
of --sklearn-docs (default: all of them), and is killed past --sklearn-max-mb or --sklearn-timeout.

    make bench-vocab   # runs both of these:
    python benchmarks/vocab_count.py --name imdb-75k --runner thread \\
        --input ../shared/data/imdb/train.parquet ../shared/data/imdb/unsup.parquet --size 1000000
    python benchmarks/make_synthetic_corpus.py --docs 2000000 --max-words 80 --out data/synthetic/zipf-2m.parquet
    python benchmarks/vocab_count.py --name synthetic-2m --runner thread --input data/synthetic/zipf-2m.parquet \\
        --size 1000000 --sklearn-max-mb 18000 --sklearn-timeout 1500
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from measure import run_measured  # noqa: E402


def sklearn_one(inputs: list[str], docs: int | None, size: int, ngram_max: int, out: str) -> None:
    """CountVectorizer(ngram_range=(1, N), max_features=V) in this process; writes its vocabulary with counts."""
    from sklearn.feature_extraction.text import CountVectorizer

    texts: list[str] = []
    for path in inputs:
        texts += pq.read_table(path, columns=["text"]).column("text").to_pylist()
    texts = texts[:docs] if docs else texts
    start = time.perf_counter()
    cv = CountVectorizer(ngram_range=(1, ngram_max), max_features=size)
    x = cv.fit_transform(texts)
    seconds = time.perf_counter() - start
    counts = np.asarray(x.sum(axis=0)).ravel()
    names = cv.get_feature_names_out()
    pq.write_table(pa.table({"ngram": names.tolist(), "count": counts.astype(np.int64)}), out)
    print(json.dumps({"fit_seconds": seconds, "docs": len(texts)}))


def compare(ours: Path, theirs: Path) -> dict:
    """Equal above the cut; at the cut both keep the same number of tied n-grams (each by its own tie rule)."""
    a, b = pq.read_table(ours).to_pydict(), pq.read_table(theirs).to_pydict()
    da, db = dict(zip(a["ngram"], a["count"], strict=True)), dict(zip(b["ngram"], b["count"], strict=True))
    cut = min(db.values()) if db else 0
    above_a = {g for g, c in da.items() if c > cut}
    above_b = {g for g, c in db.items() if c > cut}
    same_counts = all(da[g] == db[g] for g in set(da) & set(db))
    return {
        "sizes_equal": len(da) == len(db),
        "above_cut_equal": above_a == above_b,
        "counts_equal_where_both": same_counts,
        "cut_count": cut,
        "identical_sets": set(da) == set(db),
    }


def run_ours(a: argparse.Namespace, work: Path, docs: int) -> dict:
    """`sparse-distill vocab` in its own process, measured."""
    cli = [str(Path(sys.executable).parent / "sparse-distill")]
    cmd = [
        *cli,
        "vocab",
        "--input",
        *a.input,
        "--out",
        str(work / "ours"),
        "--size",
        str(a.size),
        "--ngram-max",
        str(a.ngram_max),
        "--runner",
        a.runner,
        "--workers",
        str(a.workers),
        "--memory-mb",
        str(a.memory_mb),
        "--partitions",
        str(a.partitions),
        "--shard-size",
        str(a.shard_size),
    ]
    print("ours:", " ".join(cmd), flush=True)
    ours = run_measured(cmd, stdout=subprocess.DEVNULL, stderr=open(work / "ours.log", "w"))
    meta = json.loads((work / "ours" / "vocab.json").read_text()) if ours["rc"] == 0 else {}
    ours.update(
        {
            "docs": docs,
            "docs_per_s": round(docs / ours["seconds"], 1),
            "distinct_ngrams": meta.get("distinct_ngrams"),
            "kept": meta.get("size"),
            "settings": {k: getattr(a, k) for k in ("runner", "workers", "memory_mb", "partitions", "shard_size")},
        }
    )
    print("ours:", json.dumps(ours), flush=True)
    return ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="Results go to benchmarks/results/vocab_<name>.json")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--ngram-max", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runner", default="process")
    p.add_argument("--memory-mb", type=int, default=1024)
    p.add_argument("--partitions", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--sklearn-docs", type=int, nargs="*", default=None, help="Prefix sizes (default: all docs).")
    p.add_argument("--sklearn-max-mb", type=float, default=20_000)
    p.add_argument("--sklearn-timeout", type=float, default=1800)
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--skip-ours", action="store_true", help="Only CountVectorizer (e.g. on prefixes of a corpus).")
    p.add_argument("--work", default="data/bench-vocab")
    a = p.parse_args()
    if a.sklearn_docs is not None and len(a.sklearn_docs) == 0:
        a.sklearn_docs = None

    work = Path(a.work) / a.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    docs = sum(pq.ParquetFile(f).metadata.num_rows for f in a.input)
    ours = None if a.skip_ours else run_ours(a, work, docs)
    results = {"name": a.name, "inputs": a.input, "size": a.size, "ngram_max": a.ngram_max, "ours": ours, "sklearn": []}
    for n in [None] if a.sklearn_docs is None else a.sklearn_docs:
        if a.skip_sklearn:
            break
        out = work / f"sklearn-{n or 'all'}.parquet"
        cmd = [
            sys.executable,
            __file__,
            "--name",
            a.name,
            "--input",
            *a.input,
            "--sklearn-one",
            str(n or 0),
            str(out),
            "--size",
            str(a.size),
            "--ngram-max",
            str(a.ngram_max),
        ]
        print("sklearn:", " ".join(cmd), flush=True)
        res = run_measured(cmd, timeout=a.sklearn_timeout, kill_above_mb=a.sklearn_max_mb)
        res["docs"] = n or docs
        if res["rc"] == 0:
            res["docs_per_s"] = round(res["docs"] / res["seconds"], 1)
            if ours and ours["rc"] == 0 and (n is None or n == docs):
                res["agreement"] = compare(work / "ours" / "vocab.parquet", out)
                res["ours_speedup"] = round(res["seconds"] / ours["seconds"], 2)
                res["ours_memory_share"] = round(ours["peak_rss_mb"] / res["peak_rss_mb"], 3)
        print("sklearn:", json.dumps(res), flush=True)
        results["sklearn"].append(res)
    out_json = ROOT / "benchmarks" / "results" / f"vocab_{a.name}.json"
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_json}")


if __name__ == "__main__":
    if "--sklearn-one" in sys.argv:
        i = sys.argv.index("--sklearn-one")
        n, out = int(sys.argv[i + 1]), sys.argv[i + 2]
        args = sys.argv[1:i] + sys.argv[i + 3 :]
        q = argparse.ArgumentParser()
        q.add_argument("--name")
        q.add_argument("--input", nargs="+")
        q.add_argument("--size", type=int)
        q.add_argument("--ngram-max", type=int)
        b = q.parse_args(args)
        sklearn_one(b.input, n or None, b.size, b.ngram_max, out)
    else:
        main()
