"""The `sparse-distill` command line: the whole pipeline, each stage, and prediction."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

STAGES = {
    "finetune-teacher": "finetune_teacher_flow",
    "label": "label_flow",
    "vocab": "vocab_flow",
    "distill": "distill_flow",
    "finetune-student": "finetune_student_flow",
    "evaluate": "evaluate_flow",
}


def configure_environment(project_dir: Path | None = None) -> None:
    """Embedded, offline-friendly defaults (each one overridable by setting it first).

    Prefect's ephemeral API with a project-local PREFECT_HOME, MLflow on ./mlflow.db, no telemetry.
    Must run before Prefect is imported: Prefect reads its settings at import.
    """
    project_dir = (project_dir or Path.cwd()).resolve()
    defaults = {
        "PREFECT_HOME": str(project_dir / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "sparse_distill",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="Pipeline config (YAML), e.g. configs/demo.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="Override a config value (parsed as YAML); repeatable.",
    )
    p.add_argument("--data-dir", help="Folder the config's relative data paths are read from (data.data_dir).")
    p.add_argument("--run-dir", help="Output folder (default: runs/<name>).")


def _label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="A pipeline config: label its train set/corpus in its run directory.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--data-dir", help="With CONFIG: folder of the config's relative data paths.")
    p.add_argument("--run-dir", help="With CONFIG: the run directory.")
    g = p.add_argument_group("standalone labelling")
    g.add_argument("--teacher", help="Fine-tuned teacher folder (a Hugging Face sequence classifier).")
    g.add_argument("--corpus", nargs="+", help="Corpus files (Parquet, JSONL, CSV/TSV, text one doc per line); globs.")
    g.add_argument("--out", help="Output directory: manifest.json and shards/*.parquet.")
    g.add_argument("--shard-size", type=int, default=10_000, help="Documents per shard (default 10000).")
    g.add_argument("--text-column", default="text", help="Column or JSON key of the text (default: text).")
    g.add_argument("--id-column", help="Column of document ids (default: ids derived from file and row).")
    g.add_argument("--runner", choices=["thread", "process", "dask"], default="thread", help="Task runner.")
    g.add_argument("--workers", type=int, default=1, help="Shards labelled at once (default 1).")
    g.add_argument("--dask-address", help="Scheduler of an existing Dask cluster (implies --runner dask).")
    g.add_argument("--batch-size", type=int, default=64, help="Teacher batch size (default 64).")
    g.add_argument("--max-length", type=int, default=128, help="Teacher tokens per document (default 128).")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="Teacher numerics.")
    g.add_argument("--int8", action="store_true", help="Dynamic int8 quantisation of the teacher (CPU).")
    g.add_argument("--retries", type=int, default=2, help="Retries of a failing shard (default 2).")
    g.add_argument("--limit", type=int, help="Only the first N documents of each file.")
    g.add_argument("--replan", action="store_true", help="Discard labels in --out made for another corpus.")
    g.add_argument("--no-tracking", action="store_true", help="Do not log per-shard docs/s to MLflow.")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite ./mlflow.db).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-distill", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)
    _config_args(sub.add_parser("run", help="Run the whole pipeline."))
    for name in STAGES:
        if name not in ("label", "vocab"):
            _config_args(sub.add_parser(name, help=f"Run the {name} stage in a run directory."))
    _label_args(
        sub.add_parser(
            "label",
            help="Label a corpus with a teacher (--teacher/--corpus/--out), or run a pipeline's label stage (CONFIG).",
        )
    )
    _vocab_args(
        sub.add_parser(
            "vocab",
            help="Count n-grams of a corpus and keep the top |V| (--input/--out/--size), or run a pipeline's vocab "
            "stage (CONFIG).",
        )
    )
    p = sub.add_parser("label-status", help="Done / failed / pending shards of a labelling output directory.")
    p.add_argument("out", help="The labelling output directory (holds manifest.json).")
    p.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    p = sub.add_parser("predict", help="Predict labels for texts with a student model.")
    p.add_argument("--model", required=True, help="Student model folder, or an MLflow URI (runs:/..., models:/...).")
    p.add_argument("--input", help="Texts: .txt (one per line), .parquet, .csv or .jsonl (default: stdin lines).")
    p.add_argument("--output", help="Where to write predictions: .jsonl, .csv or .parquet (default: JSONL on stdout).")
    p.add_argument("--text-column", default="text", help="Text column of a tabular input.")
    p.add_argument("--batch-size", type=int, default=1024, help="Documents per batch.")
    p.add_argument("--threads", type=int, default=1, help="Batches predicted at once (a student folder only).")
    g = p.add_argument_group(
        "cascade", "The student answers when confident, the teacher answers the rest (output gains `deferred`)."
    )
    g.add_argument("--teacher", help="Teacher model folder: the cascade's fallback (with --cascade-threshold).")
    g.add_argument(
        "--cascade-threshold",
        type=_unit_interval,
        metavar="T",
        help="Texts whose student confidence is below T (in [0, 1]) go to the teacher (with --teacher).",
    )
    g.add_argument(
        "--cascade-metric",
        choices=["max_prob", "margin"],
        default="max_prob",
        help="Student confidence: top probability, or top minus second (default max_prob).",
    )
    g.add_argument(
        "--teacher-max-length",
        type=int,
        help="Teacher tokens per text (default: what the teacher folder records, else 128).",
    )
    p = sub.add_parser(
        "quantize", help="Store a student's n-gram table as float16 or int8 (a new model folder), with its accuracy."
    )
    p.add_argument("--model", required=True, help="A float32 student model folder.")
    p.add_argument("--dtype", required=True, choices=["float16", "int8"], help="Storage of the n-gram table.")
    p.add_argument("--out", required=True, help="The new model folder.")
    p.add_argument("--eval", help="Labelled texts (.parquet, .csv, .jsonl): report accuracy before and after.")
    p.add_argument("--text-column", default="text", help="Text column of --eval.")
    p.add_argument("--label-column", default="label", help="Gold label column of --eval.")
    p = sub.add_parser(
        "experiment",
        help="Run an experiment of the paper or the blog over a base pipeline run; writes a markdown table.",
    )
    p.add_argument(
        "name",
        help="privacy, domain, ablations, baselines, wos, mlp, augment, cascade; several joined by commas, or all.",
    )
    p.add_argument("config", help="Experiment config (YAML), e.g. configs/experiments/sst2.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--keep-going", action="store_true", help="With several experiments, run the rest when one fails.")
    p = sub.add_parser("demo-data", help="Unpack the demo data and the pre-trained teacher from their packages.")
    p.add_argument("--out", default="data/demo", help="Output folder.")
    return parser


def _unit_interval(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return number


def _is_mlflow_uri(model: str) -> bool:
    return "://" in model or model.startswith(("models:/", "runs:/"))


def _check_predict_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-option checks of `predict` (argparse errors, exit status 2)."""
    if args.cascade_threshold is not None and not args.teacher:
        parser.error("predict: --cascade-threshold needs --teacher TEACHER_DIR (the teacher model folder)")
    if args.teacher and args.cascade_threshold is None:
        parser.error("predict: --teacher needs --cascade-threshold T (student confidence below T goes to the teacher)")
    if args.teacher and _is_mlflow_uri(args.model):
        parser.error(
            "predict: a cascade (--teacher, --cascade-threshold) needs a student model folder as --model, "
            f"not an MLflow URI ({args.model}); log the cascade with log_cascade_model to serve it from MLflow"
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "predict":
        _check_predict_args(parser, args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("distributed", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    configure_environment()
    from sparse_distill.config import ConfigError
    from sparse_distill.data import DataError

    try:
        if args.command == "predict":
            return _predict(args)
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "label-status":
            return _label_status(args)
        if args.command == "label" and args.config is None:
            return _label(args)
        if args.command == "vocab" and args.config is None:
            return _vocab(args)
        if args.command == "experiment":
            return _experiment(args)
        if args.command == "demo-data":
            from sparse_distill.demo import prepare_demo

            sys.stdout.write(json.dumps(prepare_demo(args.out), indent=2) + "\n")
            return 0
        return _run_flow(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        sys.stderr.write(f"sparse-distill: error: {e}\n")
        return 2


def _load(args: argparse.Namespace):
    from sparse_distill.config import load_config

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    return load_config(args.config, overrides)


def _run_flow(args: argparse.Namespace) -> int:
    config = _load(args)
    from flows import pipeline_flow as flows

    start = time.perf_counter()
    if args.command == "run":
        summary = flows.pipeline_flow(config=config, run_dir=args.run_dir)
        from sparse_distill.pipeline import results_table

        sys.stdout.write("\n" + results_table(summary) + "\n")
        sys.stdout.write(
            f"\nsummary: {Path(summary['student_model_dir']).parents[2] / 'summary.json'}  "
            f"({time.perf_counter() - start:.0f} s)\n"
        )
        return 0
    result = getattr(flows, STAGES[args.command])(config=config, run_dir=args.run_dir)
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from sparse_distill.config import EXPERIMENTS, ConfigError, load_experiment_config

    names = list(EXPERIMENTS) if args.name == "all" else [n.strip() for n in args.name.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        raise ConfigError(f"experiment: unknown {unknown or args.name!r}; choose from {', '.join(EXPERIMENTS)} or all")
    config = load_experiment_config(args.config, args.overrides)
    from flows.experiment_flow import experiment_flow

    failed = []
    for name in names:
        start = time.perf_counter()
        try:
            result = experiment_flow(name=name, config=config)
        except Exception as e:
            if not args.keep_going:
                raise
            failed.append(name)
            sys.stderr.write(f"sparse-distill: experiment {name} failed: {type(e).__name__}: {e}\n")
            continue
        sys.stdout.write(
            f"\n{result['table']}\n\n{Path(result['out_dir']) / 'results.md'} ({time.perf_counter() - start:.0f} s)\n"
        )
    return 1 if failed else 0


def _label_status(args: argparse.Namespace) -> int:
    from sparse_distill.labelling import format_status, label_status

    status = label_status(args.out)
    sys.stdout.write((json.dumps(status, indent=2) if args.json else format_status(status)) + "\n")
    return 1 if status["failed"] else 0


def _label(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from sparse_distill.config import ConfigError, LabelJob, format_validation_error

    missing = [f"--{k}" for k in ("teacher", "corpus", "out") if not getattr(args, k)]
    if missing:
        raise ConfigError(f"label: give a pipeline CONFIG, or all of --teacher, --corpus and --out (missing {missing})")
    runner = "dask" if args.dask_address else args.runner
    try:
        job = LabelJob(
            teacher=args.teacher,
            corpus=args.corpus,
            out=args.out,
            text_column=args.text_column,
            id_column=args.id_column,
            limit=args.limit,
            replan=args.replan,
            label={
                "shard_size": args.shard_size,
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "precision": args.precision,
                "quantize_int8": args.int8,
                "runner": runner,
                "workers": args.workers,
                "dask_address": args.dask_address,
                "retries": args.retries,
            },
            tracking=None
            if args.no_tracking
            else {"tracking_uri": args.tracking_uri, "experiment": "sparse-distill-labelling"},
        )
    except ValidationError as e:
        raise ConfigError(f"label: {format_validation_error(e)}") from e
    from flows.label_flow import LabellingFailed, label_corpus_flow
    from flows.runners import make_task_runner
    from sparse_distill.labelling import format_status

    start = time.perf_counter()
    with _progress_bar(job.out, "shards", "rows", "labelling"):
        try:
            status = label_corpus_flow.with_options(task_runner=make_task_runner(job.label))(job=job)
        except LabellingFailed as e:
            sys.stderr.write(f"sparse-distill: {e}\n")
            return 1
    sys.stdout.write(format_status(status) + f"\n({time.perf_counter() - start:.0f} s)\n")
    return 0


def _vocab_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="A pipeline config: build its vocabulary in its run directory.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--data-dir", help="With CONFIG: folder of the config's relative data paths.")
    p.add_argument("--run-dir", help="With CONFIG: the run directory.")
    g = p.add_argument_group("standalone counting")
    g.add_argument("--input", nargs="+", help="Corpus files (Parquet, JSONL, CSV/TSV, text one doc per line); globs.")
    g.add_argument("--out", help="Output directory: vocab.parquet (ngram, count), and the counts it resumes from.")
    g.add_argument("--size", type=int, default=1_000_000, help="Keep the top V n-grams (default 1000000).")
    g.add_argument("--ngram-max", type=int, default=4, help="Count n-grams for n = 1..N (default 4).")
    g.add_argument("--min-count", type=int, default=1, help="Drop n-grams seen fewer times (default 1).")
    g.add_argument(
        "--tie-rule",
        choices=["alphabetical", "sklearn"],
        default="alphabetical",
        help="Order among n-grams tied at the cut (default alphabetical; sklearn reads all counts).",
    )
    g.add_argument("--text-column", default="text", help="Column or JSON key of the text (default: text).")
    g.add_argument("--runner", choices=["thread", "process", "dask"], default="thread", help="Task runner.")
    g.add_argument("--workers", type=int, default=1, help="Shards or partitions at once (default 1).")
    g.add_argument("--dask-address", help="Scheduler of an existing Dask cluster (implies --runner dask).")
    g.add_argument("--shard-size", type=int, default=10_000, help="Documents per shard (default 10000).")
    g.add_argument("--memory-mb", type=int, default=1024, help="Memory per worker before spilling (default 1024).")
    g.add_argument("--partitions", type=int, default=64, help="Hash partitions of the counts (default 64).")
    g.add_argument("--retries", type=int, default=2, help="Retries of a failing shard (default 2).")
    g.add_argument("--limit", type=int, help="Only the first N documents of each file.")
    g.add_argument("--keep-spills", action="store_true", help="Keep the per-shard spills after summing.")
    g.add_argument("--replan", action="store_true", help="Discard counts in --out made for other inputs/settings.")


def _vocab(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from sparse_distill.config import ConfigError, VocabJob, format_validation_error

    missing = [f"--{k}" for k in ("input", "out") if not getattr(args, k)]
    if missing:
        raise ConfigError(f"vocab: give a pipeline CONFIG, or --input and --out (missing {missing})")
    try:
        job = VocabJob(
            inputs=args.input,
            out=args.out,
            text_column=args.text_column,
            limit=args.limit,
            replan=args.replan,
            keep_spills=args.keep_spills,
            vocab={
                "size": args.size,
                "ngram_max": args.ngram_max,
                "min_count": args.min_count,
                "tie_rule": args.tie_rule,
                "shard_size": args.shard_size,
                "memory_mb": args.memory_mb,
                "partitions": args.partitions,
                "runner": "dask" if args.dask_address else args.runner,
                "workers": args.workers,
                "dask_address": args.dask_address,
                "retries": args.retries,
            },
        )
    except ValidationError as e:
        raise ConfigError(f"vocab: {format_validation_error(e)}") from e
    from flows.count_flow import count_ngrams_flow
    from flows.runners import make_task_runner
    from sparse_distill.counting import CountingFailed

    with _progress_bar(job.out, "spills", "docs", "counting"):
        try:
            result = count_ngrams_flow.with_options(task_runner=make_task_runner(job.vocab))(job=job)
        except CountingFailed as e:
            sys.stderr.write(f"sparse-distill: {e}\n")
            return 1
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


@contextmanager
def _progress_bar(out: str, records: str, key: str, desc: str, every: float = 0.5) -> Iterator[None]:
    """A progress bar over the shard records (`out/records/*.json`, docs in `key`) appearing in `out`: it works
    whatever runner does the shards."""
    import threading

    from tqdm import tqdm

    from sparse_distill.labelling import MANIFEST

    stop = threading.Event()

    def watch() -> None:
        bar, seen = None, {}
        while not stop.wait(every):
            manifest = Path(out) / MANIFEST
            if bar is None and manifest.exists():
                total = sum(s["stop"] - s["start"] for s in json.loads(manifest.read_text())["shards"])
                # disable=None: a bar on a terminal only; logs carry the progress elsewhere.
                bar = tqdm(total=total, unit="doc", desc=desc, dynamic_ncols=True, smoothing=0.1, disable=None)
            if bar is None:
                continue
            for rec in (Path(out) / records).glob("*.json"):
                try:
                    mtime = rec.stat().st_mtime_ns
                    if seen.get(rec.name, (None, 0))[0] != mtime:
                        r = json.loads(rec.read_text())
                        seen[rec.name] = (mtime, r[key] if r.get("status") == "done" else 0)
                except (OSError, json.JSONDecodeError, KeyError):
                    continue
            done = sum(rows for _, rows in seen.values())
            if done != bar.n:
                bar.update(done - bar.n)
        if bar is not None:
            bar.close()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _read_inputs(path: str | None, text_column: str) -> list[str]:
    from sparse_distill.data import check_texts, read_table

    if path is None:
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    table = read_table(path)
    column = "text" if path.endswith(".txt") else text_column
    from sparse_distill.data import DataError

    if column not in table.column_names:
        raise DataError(f"{path}: column {column!r} not found (columns: {table.column_names}); use --text-column")
    return check_texts(table.column(column).to_pylist(), path, column)


def _predict(args: argparse.Namespace) -> int:
    import pandas as pd

    texts = _read_inputs(args.input, args.text_column)
    if _is_mlflow_uri(args.model):
        import mlflow.pyfunc

        frame = mlflow.pyfunc.load_model(args.model).predict(pd.DataFrame({"text": texts}))
    elif args.teacher:
        from sparse_distill.cascade import CascadePredictor
        from sparse_distill.config import ConfigError
        from sparse_distill.mlflow_model import cascade_predictions_frame

        try:
            cascade = CascadePredictor.load(
                args.model,
                args.teacher,
                args.cascade_threshold,
                args.cascade_metric,
                threads=args.threads,
                max_length=args.teacher_max_length,
            )
        except ValueError as e:  # e.g. the two folders' labels differ: a usage error, not a crash
            raise ConfigError(f"predict: {e}") from e
        frame = cascade_predictions_frame(cascade, texts, args.batch_size)
        logger.info("cascade: %d of %d texts deferred to the teacher", int(frame["deferred"].sum()), len(texts))
    else:
        from sparse_distill.inference import StudentPredictor
        from sparse_distill.mlflow_model import predictions_frame

        frame = predictions_frame(StudentPredictor.load(args.model, threads=args.threads), texts, args.batch_size)
    out = args.output
    if out is None:
        frame.to_json(sys.stdout, orient="records", lines=True)
    elif out.endswith(".parquet"):
        frame.to_parquet(out, index=False)
    elif out.endswith(".csv"):
        frame.to_csv(out, index=False)
    else:
        frame.to_json(out, orient="records", lines=True)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    import numpy as np

    from sparse_distill.data import DataError, read_table
    from sparse_distill.inference import StudentPredictor
    from sparse_distill.student import STUDENT_WEIGHTS, quantize_student

    quantize_student(args.model, args.out, args.dtype)
    report: dict = {
        "model": args.model,
        "out": args.out,
        "table_dtype": args.dtype,
        "weights_mb": {
            "float32": round((Path(args.model) / STUDENT_WEIGHTS).stat().st_size / 2**20, 1),
            args.dtype: round((Path(args.out) / STUDENT_WEIGHTS).stat().st_size / 2**20, 1),
        },
    }
    if args.eval:
        texts = _read_inputs(args.eval, args.text_column)
        table = read_table(args.eval)
        if args.label_column not in table.column_names:
            raise DataError(f"{args.eval}: column {args.label_column!r} not found (columns: {table.column_names})")
        report["eval"] = args.eval
        report["accuracy"] = {}
        for name, folder in (("float32", args.model), (args.dtype, args.out)):
            predictor = StudentPredictor.load(folder)
            gold = np.array(predictor.label_map.encode(table.column(args.label_column).to_pylist(), args.eval))
            predicted = predictor.predict_logits(texts).argmax(axis=1)
            report["accuracy"][name] = round(float((predicted == gold).mean()), 4)
        report["accuracy_change"] = round(report["accuracy"][args.dtype] - report["accuracy"]["float32"], 4)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
