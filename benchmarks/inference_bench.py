"""The student against its peers, end to end from raw text, in one run: accuracy, docs/s, latency, memory, size.

    python benchmarks/inference_bench.py benchmarks/inference_bench.yaml [--out benchmarks/results/inference]
        [--tasks imdb]   # re-measure some tasks, keep the others' results

For each task of the spec: the students (float32, and their float16 / int8 tables made with `quantize_student`), the
teacher through transformers at batch 32, and fastText trained on the same train labels. Each model is measured in a
fresh process, so its peak RSS (sampled over the process tree) is its own. Writes `inference.json`, one PNG per task
(accuracy against docs/s, like the paper's Figure 1) and logs all of it to MLflow (experiment `benchmarks`, the
project's sqlite store unless MLFLOW_TRACKING_URI is set). `pip install -e ".[bench]"` brings fastText and psutil.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def folder_mb(path: str | Path) -> float:
    """Size on disk of a file or a folder, MB."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


def best_of(fn, repeat: int = 3) -> float:
    """The fastest of `repeat` runs, seconds (the least disturbed by other work)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def percentiles_ms(times: list[float]) -> dict:
    return {
        "p50_ms": round(1e3 * float(np.percentile(times, 50)), 3),
        "p99_ms": round(1e3 * float(np.percentile(times, 99)), 3),
    }


def read_split(path: str, label_column: str, limit: int | None = None, seed: int = 13) -> tuple[list[str], list]:
    """Texts and gold labels; `limit` takes a seeded random sample (test files may be sorted by label)."""
    table = pq.read_table(ROOT / path, columns=["text", label_column])
    if limit is not None and limit < table.num_rows:
        rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, limit, replace=False))
        table = table.take(rows)
    return table.column("text").to_pylist(), table.column(label_column).to_pylist()


def copy_bandwidth_gbs(mb: int = 512) -> float:
    """Memory bandwidth as a large numpy copy sees it (read + write), GB/s."""
    src = np.ones(mb * 2**20 // 8)
    dst = np.empty_like(src)
    return 2 * src.nbytes / best_of(lambda: np.copyto(dst, src)) / 1e9


# --- workers: one model each, in a fresh process ---------------------------------------------------------------


def student_worker(spec: dict) -> dict:
    """Load time, accuracy, docs/s per (threads, batch), single-text latency and where the time goes."""
    import torch

    from sparse_distill.inference import StudentPredictor

    start = time.perf_counter()
    predictor = StudentPredictor.load(ROOT / spec["model"])
    load_s = time.perf_counter() - start
    texts, gold = read_split(spec["test"], spec["label_column"])
    gold_ids = np.array(predictor.label_map.encode(gold, spec["test"]))
    accuracy = float((predictor.predict_logits(texts).argmax(axis=1) == gold_ids).mean())
    timed = texts[: spec["speed_docs"]]
    speed = []
    for threads in spec["threads"]:
        torch.set_num_threads(threads)
        engine = StudentPredictor(predictor.model, predictor.vocab, predictor.label_map, threads=threads)
        for batch in spec["batches"]:
            seconds = best_of(lambda: engine.predict_logits(timed, batch_size=batch))  # noqa: B023
            speed.append({"threads": threads, "batch": batch, "docs_per_s": round(len(timed) / seconds, 1)})
        engine.close()
    torch.set_num_threads(1)
    latency = []
    for text in texts[: spec["latency_docs"]]:
        t0 = time.perf_counter()
        predictor.predict_one(text)
        latency.append(time.perf_counter() - t0)
    config = predictor.model.config
    return {
        "kind": "student",
        "model": spec["model"],
        "dim": config.dim,
        "vocab_size": config.vocab_size,
        "table_dtype": config.table_dtype,
        "load_s": round(load_s, 3),
        "accuracy": round(accuracy, 4),
        "docs": len(texts),
        "speed": speed,
        "latency_one_text": percentiles_ms(latency),
        "breakdown": [breakdown(predictor, timed, b, spec["copy_bandwidth_gbs"]) for b in (32, max(spec["batches"]))],
        "size_mb": folder_mb(ROOT / spec["model"]),
    }


def breakdown(predictor, texts: list[str], batch: int, bandwidth: float) -> dict:
    """Seconds over all texts on one thread: preparing the bytes (Python: encode, lowercase non-ASCII texts),
    tokenising + hashing the words (kernel), n-gram keys + table probes (kernel), gather + pool, dense; and how the
    gather compares with reading its bytes at the copy bandwidth."""
    import torch

    from sparse_distill.vocab import encode_texts

    torch.set_num_threads(1)
    vocab, model = predictor.vocab, predictor.model
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    prepare = best_of(lambda: [encode_texts(b) for b in batches])
    encoded = [encode_texts(b) for b in batches]
    # max_order 0: the kernel tokenises and hashes every word, and looks nothing up.
    words = best_of(lambda: [vocab._featurize_encoded(*e, max_order=0) for e in encoded])
    featurize = best_of(lambda: [vocab.featurize(b) for b in batches])
    feats = [tuple(map(torch.from_numpy, vocab.featurize(b))) for b in batches]
    with torch.inference_mode():
        gather = best_of(lambda: [model.embedding(i, o) for i, o in feats])
        pooled = [model.embedding(i, o).float() for i, o in feats]
        dense = best_of(lambda: [model.head(p) for p in pooled])
    total = best_of(lambda: predictor.predict_logits(texts, batch_size=batch))
    ids = sum(len(i) for i, _ in feats)
    row_bytes = {"float32": 4, "float16": 2, "int8": 1}[model.config.table_dtype] * model.config.dim
    gathered = ids * row_bytes
    return {
        "batch": batch,
        "docs_per_s": round(len(texts) / total, 1),
        "seconds": {
            "prepare_bytes": round(prepare, 4),
            "tokenise_and_hash": round(words, 4),
            "ngram_keys_and_lookup": round(max(featurize - prepare - words, 0.0), 4),
            "gather_and_pool": round(gather, 4),
            "dense": round(dense, 4),
            "total": round(total, 4),
        },
        "ids_per_doc": round(ids / len(texts), 1),
        "gathered_mb": round(gathered / 2**20, 1),
        "copy_bandwidth_gbs": round(bandwidth, 1),
        # The gather reads each id's row once: its floor is those bytes at the copy bandwidth.
        "gather_vs_bandwidth_floor": round(gather / (gathered / (bandwidth * 1e9)), 1),
    }


def teacher_worker(spec: dict) -> dict:
    """Accuracy on a seeded sample, docs/s at batch 32, single-text latency; torch on all cores."""
    import torch

    from sparse_distill.data import LabelMap
    from sparse_distill.teacher import TeacherPredictor

    torch.set_num_threads(spec["cores"])
    teacher = TeacherPredictor(ROOT / spec["model"], max_length=spec["max_length"])
    label_map = LabelMap.load(ROOT / spec["model"] / "label_map.json")
    texts, gold = read_split(spec["test"], spec["label_column"], limit=spec["accuracy_docs"])
    predicted = teacher.predict_logits(texts, batch_size=32).argmax(axis=1)
    accuracy = float((predicted == np.array(label_map.encode(gold, spec["test"]))).mean())
    timed = texts[: spec["speed_docs"]]
    seconds = best_of(lambda: teacher.predict_logits(timed, batch_size=32), repeat=2)
    latency = []
    for text in texts[:30]:
        t0 = time.perf_counter()
        teacher.predict_logits([text], batch_size=1)
        latency.append(time.perf_counter() - t0)
    return {
        "kind": "teacher",
        "model": spec["model"],
        "max_length": spec["max_length"],
        "threads": spec["cores"],
        "accuracy": round(accuracy, 4),
        "accuracy_docs": len(texts),
        "speed": [{"threads": spec["cores"], "batch": 32, "docs_per_s": round(len(timed) / seconds, 2)}],
        "latency_one_text": percentiles_ms(latency),
        "size_mb": folder_mb(ROOT / spec["model"]),
    }


def fasttext_worker(spec: dict) -> dict:
    """fastText on the same train labels; predicted from raw text (lowercased, one line) on one core."""
    import fasttext

    from sparse_distill.baselines import fasttext_line as prepare
    from sparse_distill.baselines import write_fasttext_file

    train_texts, train_labels = read_split(spec["train"], spec["label_column"])
    texts, gold = read_split(spec["test"], spec["label_column"])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.txt")
        write_fasttext_file(path, train_texts, train_labels)  # shuffled: IMDB's train file is sorted by label
        start = time.perf_counter()
        model = fasttext.train_supervised(path, thread=spec["cores"], verbose=0, **spec["settings"])
        train_s = time.perf_counter() - start
        model.save_model(os.path.join(tmp, "model.bin"))
        size_mb = folder_mb(os.path.join(tmp, "model.bin"))
    labels, _ = model.predict([prepare(t) for t in texts])
    accuracy = float(np.mean([lab[0].removeprefix("__label__") == str(g) for lab, g in zip(labels, gold, strict=True)]))
    timed = texts[: spec["speed_docs"]]
    speed = []
    for batch in (32, len(timed)):
        chunks = [timed[i : i + batch] for i in range(0, len(timed), batch)]
        seconds = best_of(lambda: [model.predict([prepare(t) for t in c]) for c in chunks])  # noqa: B023
        speed.append({"threads": 1, "batch": batch, "docs_per_s": round(len(timed) / seconds, 1)})
    latency = []
    for text in texts[: spec["latency_docs"]]:
        t0 = time.perf_counter()
        model.predict([prepare(text)])  # the one-string form breaks on NumPy 2 in fasttext-wheel 0.9.2
        latency.append(time.perf_counter() - t0)
    return {
        "kind": "fasttext",
        "settings": spec["settings"],
        "train_s": round(train_s, 1),
        "accuracy": round(accuracy, 4),
        "docs": len(texts),
        "speed": speed,
        "latency_one_text": percentiles_ms(latency),
        "size_mb": size_mb,
    }


WORKERS = {"student": student_worker, "teacher": teacher_worker, "fasttext": fasttext_worker}


# --- the run ---------------------------------------------------------------------------------------------------


def measure(spec: dict) -> dict:
    """Run one worker in a fresh process; its result plus the peak RSS of that process."""
    from measure import run_measured

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--worker-out", str(out)]
        run = run_measured(cmd, timeout=3600)
        if run["rc"] != 0 or not out.exists():
            raise RuntimeError(f"worker failed ({run['rc']}): {spec}")
        return {**json.loads(out.read_text()), "peak_rss_mb": run["peak_rss_mb"], "wall_s": run["seconds"]}


def best_speed(result: dict, threads: int | None = None, batch: int | None = None) -> float:
    rows = [
        s["docs_per_s"]
        for s in result["speed"]
        if (threads is None or s["threads"] == threads) and (batch is None or s["batch"] == batch)
    ]
    return max(rows) if rows else float("nan")


def quantized_copy(model: str, dtype: str, out_root: Path) -> str:
    """A float16 / int8 copy of a student, made once (remade when the float32 weights are newer)."""
    from sparse_distill.student import STUDENT_WEIGHTS, quantize_student

    out = out_root / f"{Path(model).parent.parent.parent.name}-{Path(model).parent.name}-{dtype}"
    source = ROOT / model / STUDENT_WEIGHTS
    if not (out / STUDENT_WEIGHTS).exists() or (out / STUDENT_WEIGHTS).stat().st_mtime < source.stat().st_mtime:
        quantize_student(ROOT / model, out, dtype)
    return str(out.relative_to(ROOT))


def run_task(name: str, task: dict, spec: dict, cores: int, quant_root: Path) -> dict:
    common = {"test": task["test"], "label_column": task.get("label_column", "label"), "cores": cores}
    common |= {k: spec[k] for k in ("threads", "batches", "speed_docs", "latency_docs", "copy_bandwidth_gbs")}
    models: dict[str, dict] = {}
    # Students are measured with their quantised copies too; baselines (e.g. the DAN from scratch) as they are.
    entries = [(label, model, True) for label, model in task["students"].items()]
    entries += [(label, model, False) for label, model in task.get("baselines", {}).items()]
    for label, model, quantize in entries:
        if not (ROOT / model).exists():
            print(f"[{name}] {label}: {model} not found, skipped", flush=True)
            continue
        variants = [(label, model)] + [
            (f"{label} {dtype}", quantized_copy(model, dtype, quant_root))
            for dtype in (spec.get("quantize", []) if quantize else [])
        ]
        for variant, path in variants:
            models[variant] = measure({**common, "kind": "student", "model": path})
            print(f"[{name}] {variant}: {json.dumps(summary_row(models[variant]))}", flush=True)
    # "teacher" is the fine-tuned one as the pipeline runs it; other entries time it at other settings.
    for label, teacher in {"teacher": task["teacher"], **task.get("other_teachers", {})}.items():
        models[label] = measure({**common, "kind": "teacher", **teacher, "speed_docs": teacher.get("speed_docs", 256)})
        print(f"[{name}] {label}: {json.dumps(summary_row(models[label]))}", flush=True)
    try:
        import fasttext  # noqa: F401

        models["fastText"] = measure(
            {**common, "kind": "fasttext", "train": task["train"], "settings": task.get("fasttext", {})}
        )
        print(f"[{name}] fastText: {json.dumps(summary_row(models['fastText']))}", flush=True)
    except ImportError:
        print(f"[{name}] fastText not installed (pip install -e '.[bench]'): skipped", flush=True)
    return {"models": models, "targets": targets(models)}


def summary_row(r: dict) -> dict:
    return {
        "accuracy": r["accuracy"],
        "docs_per_s_batch32_1thread": best_speed(r, threads=1, batch=32),
        "docs_per_s_best_1thread": best_speed(r, threads=1),
        "docs_per_s_best": best_speed(r),
        **r["latency_one_text"],
        "peak_rss_mb": r["peak_rss_mb"],
        "size_mb": r["size_mb"],
    }


def targets(models: dict[str, dict]) -> dict:
    """The issue's targets, as measured ratios (None where a model is missing)."""
    out: dict = {}
    ft, teacher = models.get("fastText"), models.get("teacher")
    d100, d1000 = models.get("DAN d=100"), models.get("DAN d=1000")
    if d100 and ft:
        fast = best_speed(ft, threads=1)
        out["d100_1thread_batch32_vs_fasttext"] = round(best_speed(d100, threads=1, batch=32) / fast, 2)
        out["d100_1thread_best_vs_fasttext"] = round(best_speed(d100, threads=1) / fast, 2)
        out["d100_2threads_best_vs_fasttext"] = round(best_speed(d100, threads=2) / fast, 2)
    if d1000:
        out["d1000_2threads_best_docs_per_s"] = best_speed(d1000, threads=2)
    if teacher:
        for key, model in (("d100", d100), ("d1000", d1000)):
            if model:
                out[f"{key}_vs_teacher"] = round(best_speed(model) / best_speed(teacher), 1)
    return out


def markdown(results: dict) -> str:
    """The results as README tables: one row per model and task, then the breakdowns."""
    fmt = lambda v: "-" if v is None or v != v else (f"{v:,.0f}" if v >= 100 else f"{v:.3g}")  # noqa: E731
    lines = [
        "| task | model | accuracy | docs/s 1 thread, batch 32 | docs/s 1 thread, best | docs/s 2 threads, best "
        "| p50 / p99 one text (ms) | peak RSS (MB) | size (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, res in results["tasks"].items():
        for model, r in res["models"].items():
            if r["kind"] == "teacher":
                one, best1, best2 = "-", "-", fmt(best_speed(r))
                best2 += f" ({r['threads']} threads, batch 32, {r['max_length']} tokens)"
                acc = f"{r['accuracy']:.4f} ({r['accuracy_docs']} docs)"
            else:
                one, best1 = fmt(best_speed(r, threads=1, batch=32)), fmt(best_speed(r, threads=1))
                best2 = fmt(best_speed(r, threads=2)) if r["kind"] == "student" else "-"
                acc = f"{r['accuracy']:.4f}"
            lat = r["latency_one_text"]
            lines.append(
                f"| {task} | {model} | {acc} | {one} | {best1} | {best2} | {lat['p50_ms']:.2f} / {lat['p99_ms']:.2f} "
                f"| {r['peak_rss_mb']:,} | {r['size_mb']:,.0f} |"
            )
    lines += [
        "",
        "| task | model | batch | prepare bytes | tokenise + hash | n-gram keys + lookup | gather + pool | dense "
        "| total (s) | gather / bandwidth floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, res in results["tasks"].items():
        for model, r in res["models"].items():
            for b in r.get("breakdown", []):
                # Results kept from an older run may lack a column: shown as "-".
                sec = {k: "-" for k in ("prepare_bytes", "tokenise_and_hash")}
                sec |= {k: f"{v:.4f}" if k == "dense" else f"{v:.3f}" for k, v in b["seconds"].items()}
                lines.append(
                    f"| {task} | {model} | {b['batch']} | {sec['prepare_bytes']} | {sec['tokenise_and_hash']} "
                    f"| {sec['ngram_keys_and_lookup']} | {sec['gather_and_pool']} | {sec['dense']} "
                    f"| {sec['total']} | {b['gather_vs_bandwidth_floor']}x |"
                )
    return "\n".join(lines) + "\n"


def log_to_mlflow(results: dict, out_dir: Path, pngs: list[Path]) -> str:
    import mlflow

    from sparse_distill.mlflow_model import ensure_experiment, tracking_uri_default

    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri_default(ROOT)
    experiment = ensure_experiment("benchmarks", uri, ROOT / "mlartifacts")
    client = mlflow.MlflowClient(uri)
    run = client.create_run(experiment, run_name="inference", tags={"benchmark": "inference"})
    run_id = run.info.run_id
    for task, res in results["tasks"].items():
        for model, r in res["models"].items():
            key = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{task}.{model}")
            for metric, value in summary_row(r).items():
                if isinstance(value, int | float) and np.isfinite(value):
                    client.log_metric(run_id, f"{key}.{metric}", float(value))
        for metric, value in res["targets"].items():
            client.log_metric(run_id, f"{task}.target.{metric}", float(value))
    client.log_artifact(run_id, str(out_dir / "inference.json"))
    client.log_artifact(run_id, str(out_dir / "inference.md"))
    for png in pngs:
        client.log_artifact(run_id, str(png))
    client.set_terminated(run_id)
    return run_id


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", default=str(ROOT / "benchmarks/inference_bench.yaml"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/inference"))
    p.add_argument(
        "--tasks",
        nargs="*",
        help="Only these tasks of the spec; the other tasks' results already in OUT/inference.json are kept.",
    )
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        spec = json.loads(a.worker)
        Path(a.worker_out).write_text(json.dumps(WORKERS[spec["kind"]](spec)))
        return

    from sparse_distill.inference import default_threads
    from sparse_distill.plots import plot_accuracy_vs_speed

    spec = yaml.safe_load(Path(a.spec).read_text())
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cores = default_threads()
    started = time.perf_counter()
    # Measured here, once: the 1 GB of buffers would otherwise count in every worker's peak RSS.
    spec["copy_bandwidth_gbs"] = round(copy_bandwidth_gbs(), 1)
    results: dict = {"spec": spec, "cores": cores, "tasks": {}}
    previous = out_dir / "inference.json"
    if a.tasks and previous.exists():
        # A partial run replaces its tasks and keeps the others, each with its own wall time and date.
        results["tasks"] = json.loads(previous.read_text()).get("tasks", {})
    for name, task in spec["tasks"].items():
        if a.tasks and name not in a.tasks:
            continue
        task_started = time.perf_counter()
        results["tasks"][name] = run_task(name, task, spec, cores, ROOT / "data/bench-inference")
        results["tasks"][name]["wall_s"] = round(time.perf_counter() - task_started, 1)
        results["tasks"][name]["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        print(f"[{name}] targets: {json.dumps(results['tasks'][name]['targets'])}", flush=True)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    tmp = out_dir / "inference.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out_dir / "inference.json")
    (out_dir / "inference.md").write_text(markdown(results))
    pngs = []
    for name, res in results["tasks"].items():
        points = [{"name": m, "accuracy": r["accuracy"], "docs_per_s": best_speed(r)} for m, r in res["models"].items()]
        pngs.append(
            plot_accuracy_vs_speed(points, out_dir / f"accuracy_vs_speed_{name}.png", f"{name}: accuracy vs. docs/s")
        )
    print(f"wrote {out_dir / 'inference.json'} and {len(pngs)} plots in {results['wall_s']} s")
    if not a.no_mlflow:
        print(f"MLflow run {log_to_mlflow(results, out_dir, pngs)} (experiment 'benchmarks')")
    shutil.rmtree(out_dir / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
