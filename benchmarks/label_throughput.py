"""Teacher labelling throughput: sparse-distill's labeller against a plain transformers pipeline.

Same model, same texts, same max_length; the pipeline at batch_size=32 (truncating to max_length, as it must for long
reviews). Prints docs/s for each, the speed-up, and the largest probability difference; writes JSON.

    python benchmarks/label_throughput.py --teacher runs/sst2/teacher/model \
        --corpus ../shared/data/imdb/unsup.parquet --docs 2000 --max-length 256
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pipeline_probs(teacher: str, texts: list[str], max_length: int, batch_size: int) -> tuple[np.ndarray, float]:
    from transformers import pipeline

    clf = pipeline("text-classification", model=teacher, device=-1, top_k=None)
    labels = [clf.model.config.id2label[i] for i in range(clf.model.config.num_labels)]
    clf(texts[:8], batch_size=batch_size, truncation=True, max_length=max_length)  # warm-up
    start = time.perf_counter()
    out = clf(texts, batch_size=batch_size, truncation=True, max_length=max_length)
    seconds = time.perf_counter() - start
    probs = np.array([[{d["label"]: d["score"] for d in row}[lab] for lab in labels] for row in out])
    return probs, seconds


def ours_probs(
    teacher: str, texts: list[str], max_length: int, batch_size: int, int8: bool = False, precision: str = "fp32"
) -> tuple[np.ndarray, float]:
    from sparse_distill.teacher import TeacherPredictor

    t = TeacherPredictor(teacher, max_length=max_length, quantize_int8=int8, precision=precision)
    t.predict_proba(texts[:8], batch_size)  # warm-up
    start = time.perf_counter()
    probs = t.predict_proba(texts, batch_size)
    return probs, time.perf_counter() - start


def cli_label(teacher: str, corpus: Path, out: Path, args: list[str]) -> float:
    """The `sparse-distill label` command end to end (plan, shards, Parquet, manifest), wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "flows.cli", "label", "--teacher", teacher, "--corpus", str(corpus)]
    cmd += ["--out", str(out), "--no-tracking", *args]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="A fine-tuned sequence classifier folder.")
    p.add_argument("--corpus", default=str(ROOT.parent / "shared/data/imdb/unsup.parquet"))
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="sparse-distill's batch size (the pipeline's: 32).")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/label_throughput.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    texts = pq.read_table(args.corpus, columns=["text"]).slice(0, args.docs).column("text").to_pylist()
    n, threads = len(texts), torch.get_num_threads()
    print(f"{n} docs from {args.corpus}, max_length {args.max_length}, {threads} torch threads")

    ref, t_pipe = pipeline_probs(args.teacher, texts, args.max_length, 32)
    print(f"transformers pipeline (batch 32):          {n / t_pipe:7.1f} docs/s")
    result = {"docs": n, "max_length": args.max_length, "threads": threads, "pipeline_docs_per_s": n / t_pipe}
    for bs in sorted({32, args.batch_size}):
        probs, t = ours_probs(args.teacher, texts, args.max_length, bs)
        diff = float(np.abs(probs - ref).max())
        print(
            f"sparse-distill TeacherPredictor (batch {bs:3d}): {n / t:7.1f} docs/s  "
            f"{t_pipe / t:4.2f}x  max |dp| {diff:.1e}"
        )
        result[f"ours_batch{bs}_docs_per_s"] = n / t
        result[f"ours_batch{bs}_max_abs_prob_diff"] = diff
    for name, kw in (("bf16", {"precision": "bf16"}), ("int8", {"int8": True})):
        probs, t = ours_probs(args.teacher, texts, args.max_length, args.batch_size, **kw)
        diff, agree = float(np.abs(probs - ref).max()), float((probs.argmax(1) == ref.argmax(1)).mean())
        print(
            f"  + {name} (batch {args.batch_size}):                       {n / t:7.1f} docs/s  {t_pipe / t:4.2f}x  "
            f"max |dp| {diff:.1e}, same argmax {agree:.4f}"
        )
        result.update(
            {f"{name}_docs_per_s": n / t, f"{name}_max_abs_prob_diff": diff, f"{name}_argmax_agreement": agree}
        )

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.parquet"
        pq.write_table(pa.table({"text": texts}), corpus)
        common = ["--shard-size", str(max(1, n // 2)), "--max-length", str(args.max_length)]
        common += ["--batch-size", str(args.batch_size)]
        for name, extra in (("cli_thread1", []), ("cli_process2", ["--runner", "process", "--workers", "2"])):
            wall = cli_label(args.teacher, corpus, Path(tmp) / name, common + extra)
            manifest = json.loads((Path(tmp) / name / "manifest.json").read_text())
            busy = sum(s["seconds"] for s in manifest["shards"])
            print(
                f"sparse-distill label {' '.join(extra) or '(1 thread)':30s} {n / wall:7.1f} docs/s wall "
                f"(incl. start-up), {n / busy * (2 if extra else 1):7.1f} docs/s in shards; {t_pipe / wall:4.2f}x"
            )
            result[f"{name}_wall_docs_per_s"] = n / wall
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
