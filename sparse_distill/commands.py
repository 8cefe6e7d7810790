"""The library side of the command line: flags to typed jobs, prediction I/O, the quantisation report, progress.

`flows/cli.py` (the `sparse-distill` console script) parses the arguments and starts flows; everything here is plain
library code that it calls, so this module never imports Prefect, `flows` or `tasks`.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sparse_distill.data import DataError, check_texts, read_table, read_text_lines

if TYPE_CHECKING:
    import pandas as pd

    from sparse_distill.config import LabelJob, VocabJob

logger = logging.getLogger(__name__)

# A job field's value: the name of the flag (argparse dest) it comes from, or a function of all the flags.
FlagSource = str | Callable[[Mapping[str, Any]], Any]


def _runner(flags: Mapping[str, Any]) -> str:
    # --dask-address names a cluster: it implies the Dask runner whatever --runner says.
    return "dask" if flags["dask_address"] else flags["runner"]


def _label_tracking(flags: Mapping[str, Any]) -> dict[str, Any] | None:
    if flags["no_tracking"]:
        return None
    return {"tracking_uri": flags["tracking_uri"], "experiment": "sparse-distill-labelling"}


@dataclass(frozen=True)
class JobFlags:
    """How a standalone command's flags fill its job: `fields` at the job's top level, `section` its runner config."""

    # The job model's name in `sparse_distill.config`, imported when a job is built: predicting needs no pydantic.
    job: Literal["LabelJob", "VocabJob"]
    required: tuple[str, ...]
    fields: dict[str, FlagSource]
    section: str
    section_fields: dict[str, FlagSource] = field(default_factory=dict)


# Flags every standalone job has, and the runner flags of its section (the same names in both commands).
_JOB_COMMON: dict[str, FlagSource] = {"out": "out", "text_column": "text_column", "limit": "limit", "replan": "replan"}
_RUNNER_COMMON: dict[str, FlagSource] = {
    "shard_size": "shard_size",
    "runner": _runner,
    "workers": "workers",
    "dask_address": "dask_address",
    "retries": "retries",
}

# The one place where the flags of `sparse-distill label` and `sparse-distill vocab` map onto their jobs.
JOB_FLAGS: dict[str, JobFlags] = {
    "label": JobFlags(
        job="LabelJob",
        required=("teacher", "corpus", "out"),
        fields={
            "teacher": "teacher",
            "corpus": "corpus",
            "id_column": "id_column",
            "tracking": _label_tracking,
            **_JOB_COMMON,
        },
        section="label",
        section_fields={
            "batch_size": "batch_size",
            "max_length": "max_length",
            "precision": "precision",
            "quantize_int8": "int8",
            **_RUNNER_COMMON,
        },
    ),
    "vocab": JobFlags(
        job="VocabJob",
        required=("input", "out"),
        fields={"inputs": "input", "keep_spills": "keep_spills", **_JOB_COMMON},
        section="vocab",
        section_fields={
            "size": "size",
            "ngram_max": "ngram_max",
            "min_count": "min_count",
            "tie_rule": "tie_rule",
            "memory_mb": "memory_mb",
            "partitions": "partitions",
            **_RUNNER_COMMON,
        },
    ),
}


def _flag_list(flags: list[str]) -> str:
    """`--a and --b`, or `all of --a, --b and --c`."""
    names = [f"--{f.replace('_', '-')}" for f in flags]
    joined = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"all of {joined}" if len(names) > 2 else joined


def job_from_flags(command: str, flags: Mapping[str, Any]) -> LabelJob | VocabJob:
    """The typed job of a standalone `label` or `vocab` command from its parsed flags (`vars(args)`).

    Raises ConfigError naming the missing flags, or the job's invalid key path (e.g. `label.shard_size`).
    """
    from pydantic import ValidationError

    from sparse_distill import config

    spec = JOB_FLAGS[command]
    missing = [f"--{k.replace('_', '-')}" for k in spec.required if not flags.get(k)]
    if missing:
        raise config.ConfigError(
            f"{command}: give a pipeline CONFIG, or {_flag_list(list(spec.required))} (missing {missing})"
        )

    def value(source: FlagSource) -> Any:
        return source(flags) if callable(source) else flags[source]

    raw = {name: value(source) for name, source in spec.fields.items()}
    raw[spec.section] = {name: value(source) for name, source in spec.section_fields.items()}
    try:
        return getattr(config, spec.job)(**raw)
    except ValidationError as e:
        raise config.ConfigError(f"{command}: {config.format_validation_error(e)}") from e


def is_mlflow_uri(model: str) -> bool:
    """Whether `--model` names an MLflow model (runs:/, models:/, a URI) rather than a student folder."""
    return "://" in model or model.startswith(("models:/", "runs:/"))


# `predict`'s input and output columns: each output row is the input row `row` (0-based, in input order), with
# `id` from --id-column, the prediction, and `empty`: the rule for empty texts, the same on every input path.
ROW_COLUMN = "row"
ID_COLUMN = "id"
EMPTY_COLUMN = "empty"
STDIN = "<stdin>"


def read_texts(path: str | None, text_column: str) -> list[str]:
    """Texts that must all be non-empty (e.g. `quantize --eval`): stdin lines (path None), a .txt file (one per line,
    split on "\\n" only) or a column of a table file; an empty or missing text is a DataError naming its row."""
    inp = read_predict_input(path, text_column)
    return check_texts(inp["text"].tolist(), path or STDIN, "text" if _is_text_input(path) else text_column)


def _is_text_input(path: str | None) -> bool:
    return path is None or path.endswith(".txt") or Path(path).suffix == ""


def read_predict_input(path: str | None, text_column: str = "text", id_column: str | None = None) -> pd.DataFrame:
    """`predict`'s input, one row per input row in input order: `row`, `id` (with `id_column`), `text`, `empty`.

    Lines of stdin (path None) or of a .txt file are split on "\\n" only, a trailing "\\r" removed (the rule of
    `data.read_text_lines`, which corpora use too); a table file (.parquet, .csv, .jsonl) gives its `text_column`.
    The rule for empty texts, on every path: a text that is empty, only whitespace, or missing (null) is kept, with
    `empty` true and "" as its text, so it is predicted from the model's biases alone (no n-gram is present); a text
    that is not a string is a DataError naming the file, row and column.
    """
    import pandas as pd

    if path is None:
        values: list[Any] = list(read_text_lines(sys.stdin.buffer, STDIN))
        source, column = STDIN, "text"
        ids = None
        if id_column:
            raise DataError(f"{STDIN}: --id-column needs a table file as --input (stdin lines have no columns)")
    else:
        table = read_table(path)
        column = "text" if _is_text_input(path) else text_column
        if column not in table.column_names:
            raise DataError(f"{path}: column {column!r} not found (columns: {table.column_names}); use --text-column")
        values, source = table.column(column).to_pylist(), path
        ids = None
        if id_column:
            if id_column not in table.column_names:
                raise DataError(f"{path}: column {id_column!r} not found (columns: {table.column_names})")
            ids = [None if v is None else str(v) for v in table.column(id_column).to_pylist()]
    texts, empty = [], []
    for row, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{source}: row {row}, column {column!r}: text is {type(value).__name__}, not a string")
        blank = value is None or not value.strip()
        texts.append("" if blank else value)
        empty.append(blank)
    frame = {ROW_COLUMN: pd.Series(range(len(texts)), dtype="int64")}
    if ids is not None:
        frame[ID_COLUMN] = pd.Series(ids, dtype=object)
    frame["text"] = pd.Series(texts, dtype=object)
    frame[EMPTY_COLUMN] = pd.Series(empty, dtype=bool)
    if any(empty):
        logger.warning("%s: %d empty texts, predicted from the biases alone (`empty` is true)", source, sum(empty))
    return pd.DataFrame(frame)


def predict_rows(model: str, rows: pd.DataFrame, **kwargs: Any) -> pd.DataFrame:
    """`predict_texts` over `read_predict_input`'s rows: `row` (and `id`) first, then the prediction, then `empty`;
    one output row per input row, in input order."""
    import pandas as pd

    frame = predict_texts(model, rows["text"].tolist(), **kwargs).reset_index(drop=True)
    if len(frame) != len(rows):  # never expected: the contract this function exists for
        raise RuntimeError(f"{len(rows)} texts in, {len(frame)} predictions out")
    keys = rows[[c for c in (ROW_COLUMN, ID_COLUMN) if c in rows.columns]].reset_index(drop=True)
    return pd.concat([keys, frame, rows[[EMPTY_COLUMN]].reset_index(drop=True)], axis=1)


def load_mlflow_model(uri: str):
    """A pyfunc model from an MLflow URI, through MLFLOW_TRACKING_URI or else the project's ./mlflow.db, which must
    exist: loading never creates a tracking store. A model that is not there is a DataError naming the URI."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from sparse_distill.mlflow_model import resolve_tracking_uri

    tracking = resolve_tracking_uri(None, Path.cwd())
    if uri.startswith(("models:/", "runs:/")) and tracking.startswith("sqlite:///"):
        db = Path(tracking[len("sqlite:///") :])
        if not db.exists():
            raise DataError(
                f"{uri}: no MLflow tracking store at {db} (set MLFLOW_TRACKING_URI to the store that holds the model)"
            )
    mlflow.set_tracking_uri(tracking)
    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as e:
        first = str(e.message if hasattr(e, "message") else e).strip().splitlines()[0]
        raise DataError(f"{uri}: cannot load this model from {tracking}: {first}") from e
    except OSError as e:
        raise DataError(f"{uri}: cannot load this model from {tracking}: {e}") from e


# Up to this many texts, a local student folder predicts with the numpy engine (see `predict_texts`).
NUMPY_PREDICT_MAX_TEXTS = 5_000


def predict_texts(
    model: str,
    texts: list[str],
    *,
    batch_size: int = 1024,
    threads: int = 1,
    teacher: str | None = None,
    cascade_threshold: float | None = None,
    cascade_metric: str = "max_prob",
    teacher_max_length: int | None = None,
) -> pd.DataFrame:
    """Predictions (label, prob_<label> per class, and `deferred` for a cascade) of a student folder, an MLflow
    model URI, or a student + teacher cascade (with `teacher` and `cascade_threshold`)."""
    import pandas as pd

    if is_mlflow_uri(model):
        return load_mlflow_model(model).predict(pd.DataFrame({"text": pd.Series(texts, dtype=object)}))
    if teacher:
        from sparse_distill.cascade import CascadePredictor
        from sparse_distill.mlflow_model import cascade_predictions_frame

        try:
            cascade = CascadePredictor.load(
                model, teacher, cascade_threshold, cascade_metric, threads=threads, max_length=teacher_max_length
            )
        except ValueError as e:  # e.g. the two folders' labels differ: a usage error, not a crash
            from sparse_distill.config import ConfigError

            raise ConfigError(f"predict: {e}") from e
        frame = cascade_predictions_frame(cascade, texts, batch_size)
        logger.info("cascade: %d of %d texts deferred to the teacher", int(frame["deferred"].sum()), len(texts))
        return frame
    # Not mlflow_model's: a local folder needs no MLflow import (about 0.7 s of start-up).
    from sparse_distill.inference import StudentPredictor, predictions_frame

    # A few texts: the numpy engine, which starts without importing torch (about a second); many, or several
    # threads: torch's fused kernels, faster per batch.
    engine = "numpy" if threads == 1 and len(texts) <= NUMPY_PREDICT_MAX_TEXTS else "torch"
    return predictions_frame(StudentPredictor.load(model, threads=threads, engine=engine), texts, batch_size)


def write_predictions(frame: pd.DataFrame, out: str | None) -> None:
    """Predictions as JSONL on stdout (out None), or to a .parquet, .csv or (otherwise) JSONL file."""
    if out is None:
        frame.to_json(sys.stdout, orient="records", lines=True)
    elif out.endswith(".parquet"):
        frame.to_parquet(out, index=False)
    elif out.endswith(".csv"):
        frame.to_csv(out, index=False)
    else:
        frame.to_json(out, orient="records", lines=True)


def quantize_report(
    model: str,
    out: str,
    dtype: str,
    eval_path: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
) -> dict[str, Any]:
    """Write `model` with its n-gram table stored as `dtype` into `out`; report both weight sizes and, with a
    labelled `eval_path`, the accuracy before and after."""
    import numpy as np

    from sparse_distill.data import read_table
    from sparse_distill.inference import StudentPredictor
    from sparse_distill.student import STUDENT_WEIGHTS, quantize_student

    quantize_student(model, out, dtype)
    report: dict[str, Any] = {
        "model": model,
        "out": out,
        "table_dtype": dtype,
        "weights_mb": {
            "float32": round((Path(model) / STUDENT_WEIGHTS).stat().st_size / 2**20, 1),
            dtype: round((Path(out) / STUDENT_WEIGHTS).stat().st_size / 2**20, 1),
        },
    }
    if eval_path:
        texts = read_texts(eval_path, text_column)
        table = read_table(eval_path)
        if label_column not in table.column_names:
            raise DataError(f"{eval_path}: column {label_column!r} not found (columns: {table.column_names})")
        report["eval"] = eval_path
        report["accuracy"] = {}
        for name, folder in (("float32", model), (dtype, out)):
            predictor = StudentPredictor.load(folder)
            gold = np.array(predictor.label_map.encode(table.column(label_column).to_pylist(), eval_path))
            predicted = predictor.predict_logits(texts).argmax(axis=1)
            report["accuracy"][name] = round(float((predicted == gold).mean()), 4)
        report["accuracy_change"] = round(report["accuracy"][dtype] - report["accuracy"]["float32"], 4)
    return report


def explain_report(model: str, texts: list[str], top: int = 10, as_json: bool = False) -> str:
    """What `sparse-distill explain` prints: for each text its prediction and the `top` n-grams that moved it most;
    without texts, the model's `top` n-grams per label on their own. Markdown, or JSON (one object) with `as_json`."""
    from sparse_distill.api import load_student

    student = load_student(model)
    if not texts:
        per_label = student.top_ngrams(top)
        if as_json:
            return json.dumps({str(k): [{"ngram": g, "log_odds": s} for g, s in v] for k, v in per_label.items()})
        lines = []
        for label, ngrams in per_label.items():
            lines += [f"## {label}", "", "| n-gram | log-odds alone |", "|---|---|"]
            lines += [f"| `{g}` | {s:+.3f} |" for g, s in ngrams]
            lines.append("")
        return "\n".join(lines)
    explanations = [student.explain(t, top) for t in texts]
    if as_json:
        return json.dumps([e.to_dict() for e in explanations], default=str)
    return "\n\n".join(e.to_markdown() for e in explanations)


@contextmanager
def progress_bar(out: str, records: str, key: str, desc: str, every: float = 0.5) -> Iterator[None]:
    """A progress bar over the shard records (`out/records/*.json`, docs in `key`) appearing in `out`: it works
    whatever runner does the shards, since it only watches the files."""
    from tqdm import tqdm

    from sparse_distill.shard_plan import MANIFEST

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
