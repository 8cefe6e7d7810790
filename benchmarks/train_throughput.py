"""Student training throughput against fastText's, on the same texts with the same threads, in one run.

    python benchmarks/train_throughput.py --docs 5000 --vocab-size 1000000 --dims 100
    make bench-train

The texts are IMDB train + unlabelled reviews (`--data`, raw text in: featurising is part of every step). The
vocabulary is the top `--vocab-size` 1-4-grams counted over the same texts (fewer when they hold fewer), and the DAN
averages them (`PAPER_POOLING`): the paper's student, whatever the pipeline's defaults. The DAN's
targets are random Dirichlet(1, 1) class distributions, seeded: a throughput benchmark measures the work of a pass,
not what is learnt, so no teacher is needed; fastText gets the argmax of the same targets as its labels.

Each measurement runs in its own process (`--child`), whose whole process tree's peak RSS is sampled
(`benchmarks/measure.py`). Both trainers are timed the same way: docs/s per pass is the difference between a run of
2 x `--passes` passes and one of `--passes`, each from a new model (fastText: `train_supervised` with that many
epochs; the DAN: `train_student` on the raw texts), so what every run pays once cancels out: fastText's file reading,
dictionary and matrix set-up, the DAN's featurising of the texts and the first touch of its table's and optimizer's
memory (most of a short d = 1000 run). `docs_per_s_whole_call` keeps the first run's whole call. Once-per-process
costs (loading the vocabulary, torch's import of torch._dynamo, numba's kernels loading from its cache) come before
the timer. Results go to `benchmarks/results/train_throughput.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from sparse_distill.vocab import NgramVocab

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, whatever the interpreter has installed
sys.path.insert(0, str(ROOT / "benchmarks"))

from fasttext_baseline import prepare  # noqa: E402
from measure import run_measured  # noqa: E402

NUM_CLASSES = 2


def load_texts(data_dir: Path, docs: int) -> list[str]:
    """The first `docs` reviews of train, then of the unlabelled set."""
    texts: list[str] = []
    for name in ("train.parquet", "unsup.parquet"):
        if len(texts) >= docs:
            break
        table = pq.read_table(data_dir / name, columns=["text"])
        texts.extend(table.column("text").to_pylist()[: docs - len(texts)])
    return texts


# The paper's mean-pooled DAN over 1-4-grams, the setting of the recorded figures (the pipeline's default is sum).
PAPER_POOLING = "mean"


def random_targets(n: int, seed: int = 13) -> np.ndarray:
    """Random soft labels (Dirichlet(1, 1)): stand-ins for a teacher's, seeded."""
    return np.random.default_rng(seed).dirichlet(np.ones(NUM_CLASSES), size=n).astype(np.float32)


def warm_up(vocab: NgramVocab, texts: list[str], targets: np.ndarray, optimizer: str, device: str = "cpu") -> None:
    """One step of a tiny student through `train_student`: imports and loads everything a training needs once."""
    from sparse_distill.config import StudentConfig, TrainConfig
    from sparse_distill.training import InMemoryBatches, student_from_config, train_student

    student = StudentConfig(dim=4, hidden=4, pooling=PAPER_POOLING, members=1)
    model = student_from_config(len(vocab), NUM_CLASSES, student)
    cfg = TrainConfig(
        max_steps=1, patience=None, table_optimizer=optimizer, device=device, checkpoint_every_minutes=None
    )
    train_student(model, vocab, InMemoryBatches(texts, targets), texts[:2], [0, 1], cfg, lambda m: None)


def child_dan(
    work: Path, dim: int, optimizer: str, batch_size: int, threads: int, passes: int, device: str = "cpu"
) -> dict:
    """DAN training on the texts, as fastText is measured: a run of `passes` passes and one of 2 x `passes`, each with
    a new student; docs/s per pass from the difference of the two (set-up, featurising the texts once, and the first
    touch of the table's and its optimizer's memory cancel: 6 of 8 s at d = 1000), and the first run's whole call."""
    import gc

    import torch

    from sparse_distill.config import StudentConfig, TrainConfig
    from sparse_distill.training import InMemoryBatches, student_from_config, train_student
    from sparse_distill.vocab import NgramVocab

    torch.set_num_threads(threads)
    texts = json.loads((work / "texts.json").read_text())
    targets = random_targets(len(texts))
    vocab = NgramVocab.load(work / "vocab")
    # Once-per-process costs, like loading the vocabulary, that fastText's figure (the difference of two runs) leaves
    # out as well: torch's optimizers import torch._dynamo when the first one is made (about 3 s on this machine), and
    # the compiled kernels (featurising, the table's backward and update) load from numba's cache on their first call
    # (about 1.5 s): a one-step training of a d = 4 student on a few texts pays both.
    warm_up(vocab, texts[:64], targets[:64], optimizer, device)
    runs = []
    for run_passes in (passes, 2 * passes):
        torch.manual_seed(13)
        model = student_from_config(len(vocab), NUM_CLASSES, StudentConfig(dim=dim, pooling=PAPER_POOLING, members=1))
        steps = run_passes * math.ceil(len(texts) / batch_size)
        cfg = TrainConfig(
            batch_size=batch_size,
            max_steps=steps,
            eval_every=steps,
            patience=None,
            schedule="constant",
            warmup_ratio=0,
            table_optimizer=optimizer,
            device=device,
            checkpoint_every_minutes=None,
        )
        # Timed around the whole call: `train_student` featurises the texts once before its first step (raw text in).
        start = time.perf_counter()
        res = train_student(model, vocab, InMemoryBatches(texts, targets), texts[:2], [0, 1], cfg, lambda m: None)
        runs.append((time.perf_counter() - start, res))
        del model, res
        gc.collect()  # the first student's table and state go before the second is made: peak RSS is one student's
    (seconds, first), (seconds_double, _) = runs
    per_pass = max(seconds_double - seconds, 1e-9) / passes
    return {
        "docs": len(texts),
        "vocab_size": len(vocab),
        "steps": first.steps,
        "seconds": round(seconds, 2),
        "seconds_double": round(seconds_double, 2),
        "steps_seconds": round(first.seconds, 2),
        "docs_per_s_per_pass": round(len(texts) / per_pass, 1),
        "docs_per_s_whole_call": round(len(texts) * passes / seconds, 1),
        "child_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        **_gpu_memory(device),
    }


def _gpu_memory(device: str) -> dict:
    """The GPU's name and the most memory torch allocated on it in this process (a GPU run's table and state live
    there, so the process's RSS does not show them)."""
    import torch

    if not device.startswith("cuda"):
        return {}
    return {
        "gpu": torch.cuda.get_device_name(),
        "gpu_peak_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20),
    }


def child_fasttext(work: Path, dim: int, threads: int, passes: int, buckets: int) -> dict:
    """fastText supervised training on the same texts (argmax of the same targets as labels)."""
    import fasttext

    texts = json.loads((work / "texts.json").read_text())
    labels = random_targets(len(texts)).argmax(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.txt")
        with open(path, "w") as f:
            for text, label in zip(texts, labels, strict=True):
                f.write(f"__label__{label} {prepare(text)}\n")
        seconds = []
        # Twice, with `passes` and 2 x `passes` epochs: the difference is the time of `passes` passes alone, without
        # reading the file, building the dictionary and initialising the 4M-bucket matrix (seconds at small --docs).
        for epochs in (passes, 2 * passes):
            start = time.perf_counter()
            fasttext.train_supervised(
                path, dim=dim, wordNgrams=3, bucket=buckets, lr=0.5, epoch=epochs, thread=threads, verbose=0
            )
            seconds.append(time.perf_counter() - start)
    per_pass = max(seconds[1] - seconds[0], 1e-9) / passes
    return {
        "docs": len(texts),
        "seconds": round(seconds[0], 2),
        "seconds_double": round(seconds[1], 2),
        "docs_per_s_per_pass": round(len(texts) / per_pass, 1),
        "docs_per_s_whole_call": round(len(texts) * passes / seconds[0], 1),
        "child_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "settings": {"wordNgrams": 3, "bucket": buckets, "lr": 0.5, "epoch": passes},
    }


def child_tta_dan(
    work: Path, dim: int, optimizer: str, batch_size: int, threads: int, epochs: int, target: float
) -> dict:
    """Time-to-accuracy: the DAN on gold labels (shipped rates and schedule), dev scored 4 times a pass; the seconds
    from the start of training until dev accuracy first reaches `target` (evaluation time included)."""
    import torch

    from sparse_distill.config import StudentConfig, TrainConfig
    from sparse_distill.training import InMemoryBatches, student_from_config, train_student
    from sparse_distill.vocab import NgramVocab

    torch.set_num_threads(threads)
    d = json.loads((work / "tta.json").read_text())
    vocab = NgramVocab.load(work / "vocab")
    torch.manual_seed(13)
    model = student_from_config(len(vocab), NUM_CLASSES, StudentConfig(dim=dim, pooling=PAPER_POOLING, members=1))
    per_epoch = math.ceil(len(d["train_texts"]) / batch_size)
    cfg = TrainConfig(
        batch_size=batch_size,
        epochs=epochs,
        eval_every=max(1, per_epoch // 4),
        patience=None,
        table_optimizer=optimizer,
        device="cpu",
        checkpoint_every_minutes=None,
    )
    curve: list[tuple[float, int, float]] = []
    # The once-per-process imports and kernel loading, left out as in `child_dan`.
    warm_up(vocab, d["train_texts"][:64], np.eye(NUM_CLASSES, dtype=np.float32)[d["train_labels"][:64]], optimizer)

    start = time.perf_counter()

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        if "dev_accuracy" in metrics:
            curve.append((round(time.perf_counter() - start, 2), step, round(metrics["dev_accuracy"], 4)))

    data = InMemoryBatches.from_labels(d["train_texts"], d["train_labels"], NUM_CLASSES)
    res = train_student(model, vocab, data, d["dev_texts"], d["dev_labels"], cfg, lambda m: None, on_metrics)
    reached = next((t for t, _, acc in curve if acc >= target), None)
    return {
        "target": target,
        "seconds_to_target": reached,
        "best_dev_accuracy": round(res.best_dev_accuracy, 4),
        "train_seconds": round(res.seconds, 2),
        "curve": curve,
    }


def child_tta_fasttext(work: Path, dim: int, threads: int, epochs: int, buckets: int) -> dict:
    """fastText on the same gold labels: its training seconds and its final dev accuracy (the DAN's target)."""
    import fasttext

    d = json.loads((work / "tta.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.txt")
        with open(path, "w") as f:
            for text, label in zip(d["train_texts"], d["train_labels"], strict=True):
                f.write(f"__label__{label} {prepare(text)}\n")
        start = time.perf_counter()
        model = fasttext.train_supervised(
            path, dim=dim, wordNgrams=3, bucket=buckets, lr=0.5, epoch=epochs, thread=threads, verbose=0
        )
        seconds = time.perf_counter() - start
    labels, _ = model.predict([prepare(t) for t in d["dev_texts"]])
    pred = [int(lab[0].removeprefix("__label__")) for lab in labels]
    accuracy = float(np.mean([p_ == g for p_, g in zip(pred, d["dev_labels"], strict=True)]))
    return {"train_seconds": round(seconds, 2), "dev_accuracy": round(accuracy, 4), "epochs": epochs}


def prepare_tta(work: Path, data_dir: Path, docs: int, dev_docs: int, vocab_size: int) -> dict:
    """A seeded sample of gold-labelled IMDB train reviews (the files are sorted by label), test reviews as dev, and
    the vocabulary counted on the sample."""
    from sparse_distill.vocab import NgramVocab, build_vocab

    stamp = {"data": str(data_dir.resolve()), "docs": docs, "dev_docs": dev_docs, "vocab_size": vocab_size}
    if (work / "stamp.json").exists() and json.loads((work / "stamp.json").read_text()) == stamp:
        return {"vocab_size": len(NgramVocab.load(work / "vocab"))}
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(13)
    out = {}
    for split, n, key in (("train", docs, "train"), ("test", dev_docs, "dev")):
        table = pq.read_table(data_dir / f"{split}.parquet", columns=["text", "label"]).to_pydict()
        rows = rng.choice(len(table["text"]), size=min(n, len(table["text"])), replace=False)
        out[f"{key}_texts"] = [table["text"][i] for i in rows]
        out[f"{key}_labels"] = [int(table["label"][i] == "pos") for i in rows]
    (work / "tta.json").write_text(json.dumps(out))
    vocab = build_vocab(out["train_texts"], vocab_size, 4)
    vocab.save(work / "vocab")
    (work / "stamp.json").write_text(json.dumps(stamp))
    return {"vocab_size": len(vocab)}


def prepare_work(work: Path, data_dir: Path, docs: int, vocab_size: int) -> dict:
    """The texts and their vocabulary in `work` (kept: a rerun with the same settings reuses them)."""
    from sparse_distill.vocab import NgramVocab, build_vocab

    stamp = {"data": str(data_dir.resolve()), "docs": docs, "vocab_size": vocab_size}
    stamp_file = work / "stamp.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return {"vocab_size": len(NgramVocab.load(work / "vocab")), "count_seconds": None}
    work.mkdir(parents=True, exist_ok=True)
    texts = load_texts(data_dir, docs)
    (work / "texts.json").write_text(json.dumps(texts))
    start = time.perf_counter()
    vocab = build_vocab(texts, vocab_size, 4)
    vocab.save(work / "vocab")
    count_s = time.perf_counter() - start
    stamp_file.write_text(json.dumps(stamp))
    return {"vocab_size": len(vocab), "count_seconds": round(count_s, 1)}


def write_markdown(result: dict, path: Path) -> None:
    s = result["settings"]
    gpu = next((r["gpu"] for r in result["rows"] if "gpu" in r), None)
    lines = [
        f"Training throughput, one pass = {s['docs']:,} IMDB reviews (train + unlabelled), raw text in, "
        f"{s['threads']} threads, batch {s['batch_size']}, |V| = {result['vocab_size']:,}, random Dirichlet targets "
        f"({result['date']}); the DAN on {gpu or 'the CPU'}, fastText on the CPU.",
        "",
        "| trainer | d | table optimizer | docs/s per pass | vs fastText | docs/s, whole call | peak RSS (MB) |"
        + (" GPU peak (MB) |" if gpu else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['trainer']} | {row['dim']} | {row.get('optimizer', '')} | {row['error']} | | | |")
            continue
        ft = next((r for r in result["rows"] if r["trainer"] == "fastText" and r["dim"] == row["dim"]), None)
        ratio = f"{row['docs_per_s_per_pass'] / ft['docs_per_s_per_pass']:.2f}x" if ft and "error" not in ft else ""
        lines.append(
            f"| {row['trainer']} | {row['dim']} | {row.get('optimizer', '-')} | {row['docs_per_s_per_pass']:,.0f} "
            f"| {ratio} | {row.get('docs_per_s_whole_call', 0):,.0f} | {row['peak_rss_mb']:,} |"
            + (f" {row['gpu_peak_allocated_mb']:,} |" if "gpu_peak_allocated_mb" in row else (" |" if gpu else ""))
        )
    if result.get("time_to_accuracy"):
        t = result["time_to_accuracy"]
        lines += [
            "",
            f"Time to accuracy: gold labels, {s.get('tta_docs', 0):,} train reviews (seeded sample), "
            f"{s.get('tta_dev', 0):,} test reviews as dev, {s.get('tta_epochs', 0)} passes; the target is fastText's "
            "final dev accuracy.",
            "",
            "| trainer | d | table optimizer | dev accuracy | seconds to fastText's accuracy | vs fastText |",
            "|---|---|---|---|---|---|",
        ]
        for row in t:
            if "error" in row:
                lines.append(f"| {row['trainer']} | {row['dim']} | {row.get('optimizer', '-')} | {row['error']} | | |")
            elif row["trainer"] == "fastText":
                ft_s = row["train_seconds"]
                lines.append(f"| fastText | {row['dim']} | - | {row['dev_accuracy']:.4f} | {ft_s:.1f} | 1.00x |")
            else:
                reached = row["seconds_to_target"]
                shown = f"{reached:.1f}" if reached is not None else "not reached"
                ratio = f"{reached / ft_s:.1f}x" if reached is not None else ""
                lines.append(
                    f"| DAN | {row['dim']} | {row['optimizer']} | {row['best_dev_accuracy']:.4f} (best) | {shown} "
                    f"| {ratio} |"
                )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "imdb"))
    p.add_argument("--docs", type=int, default=5000, help="Reviews per pass (train first, then unlabelled).")
    p.add_argument("--vocab-size", type=int, default=1_000_000)
    p.add_argument("--dims", type=int, nargs="+", default=[100])
    p.add_argument("--optimizers", nargs="+", default=["sparse_adam", "rowwise_adagrad"])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--device", default="cpu", help="Where the DAN trains: cpu, cuda or cuda:N (fastText: the CPU).")
    p.add_argument("--buckets", type=int, default=4_000_000, help="fastText hash buckets.")
    p.add_argument(
        "--fasttext-dims",
        type=int,
        nargs="*",
        default=None,
        help="Dimensions fastText is run at (default: --dims; its 4M x d input matrix is 16 GB at d = 1000).",
    )
    p.add_argument("--kill-above-mb", type=float, default=12_000, help="Stop a run whose tree passes this RSS.")
    p.add_argument("--work", default=str(ROOT / "data" / "bench-train"), help="Texts and vocabulary (reused).")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    p.add_argument(
        "--tta-docs",
        type=int,
        default=0,
        help="Time-to-accuracy: gold-labelled train reviews (a seeded sample; 0: skip this part).",
    )
    p.add_argument("--tta-dev", type=int, default=2000, help="Time-to-accuracy: test reviews scored as dev.")
    p.add_argument("--tta-epochs", type=int, default=5, help="Time-to-accuracy: passes of both trainers.")
    p.add_argument("--target", type=float, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["dan", "fasttext", "tta-dan", "tta-fasttext"], help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    p.add_argument("--optimizer", help=argparse.SUPPRESS)
    a = p.parse_args()
    work = Path(a.work)

    if a.child == "dan":
        print(json.dumps(child_dan(work, a.dim, a.optimizer, a.batch_size, a.threads, a.passes, a.device)))
        return
    if a.child == "fasttext":
        print(json.dumps(child_fasttext(work, a.dim, a.threads, a.passes, a.buckets)))
        return
    if a.child == "tta-dan":
        print(json.dumps(child_tta_dan(work, a.dim, a.optimizer, a.batch_size, a.threads, a.tta_epochs, a.target)))
        return
    if a.child == "tta-fasttext":
        print(json.dumps(child_tta_fasttext(work, a.dim, a.threads, a.tta_epochs, a.buckets)))
        return

    prep = prepare_work(work, Path(a.data), a.docs, a.vocab_size)
    print(f"texts: {a.docs:,}, |V| = {prep['vocab_size']:,} (counted in {prep['count_seconds']} s)", file=sys.stderr)
    rows = []
    common = ["--batch-size", str(a.batch_size), "--threads", str(a.threads)]
    common += ["--passes", str(a.passes), "--buckets", str(a.buckets), "--device", a.device]
    ft_dims = a.dims if a.fasttext_dims is None else a.fasttext_dims
    runs = [("fastText", d, None) for d in ft_dims] + [("DAN", d, o) for d in a.dims for o in a.optimizers]

    def measured(child: str, trainer: str, dim: int, optimizer: str | None, extra: list[str], at: Path) -> dict:
        cmd = [sys.executable, __file__, "--child", child, "--dim", str(dim), *common, "--work", str(at), *extra]
        cmd += ["--optimizer", optimizer] if optimizer else []
        with tempfile.TemporaryFile("w+") as out:
            m = run_measured(cmd, kill_above_mb=a.kill_above_mb, stdout=out)
            out.seek(0)
            printed = out.read().strip().splitlines()
        row = {"trainer": trainer, "dim": dim, **({"optimizer": optimizer} if optimizer else {})}
        if m["rc"] != 0:
            row["error"] = f"rc {m['rc']}"
        else:
            row.update(json.loads(printed[-1]))
        row["peak_rss_mb"] = m["peak_rss_mb"]
        print(json.dumps(row), file=sys.stderr)
        return row

    for trainer, dim, optimizer in runs:
        rows.append(measured("dan" if trainer == "DAN" else "fasttext", trainer, dim, optimizer, [], work))

    tta: list[dict] = []
    if a.tta_docs:
        tta_work = work.parent / f"{work.name}-tta"
        tta_prep = prepare_tta(tta_work, Path(a.data), a.tta_docs, a.tta_dev, a.vocab_size)
        epochs = ["--tta-epochs", str(a.tta_epochs)]
        for dim in a.dims:
            ft = measured("tta-fasttext", "fastText", dim, None, epochs, tta_work)
            tta.append({**ft, "vocab_size": tta_prep["vocab_size"]})
            if "error" in ft:
                continue
            for optimizer in a.optimizers:
                target = ["--target", str(ft["dev_accuracy"])]
                tta.append(measured("tta-dan", "DAN", dim, optimizer, [*epochs, *target], tta_work))
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "settings": {
            "docs": a.docs,
            "batch_size": a.batch_size,
            "threads": a.threads,
            "passes": a.passes,
            "device": a.device,
            "targets": "random Dirichlet(1, 1), seeded (a throughput benchmark: no teacher)",
            "tta_docs": a.tta_docs,
            "tta_dev": a.tta_dev,
            "tta_epochs": a.tta_epochs,
        },
        "vocab_size": prep["vocab_size"],
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "time_to_accuracy": tta,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
