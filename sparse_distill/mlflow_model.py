"""The student as an MLflow pyfunc model: log a student model folder into an existing run, load it anywhere.

The logged model carries the student folder (safetensors weights, shape, label map, vocabulary) as an artifact and the
`sparse_distill` package as code, so `mlflow.pyfunc.load_model(uri)` works where sparse_distill is not installed. The
model itself is logged as code (MLflow's models-from-code: `mlflow_student_model.py`, `mlflow_cascade_model.py`), not
as a cloudpickled instance, so loading a logged or registered model unpickles nothing.

Thread safety: the fluent "active run" is thread-local, and `mlflow.start_run(run_id=...)` ends the run on exit. So
`log_student_model` never touches the active-run stack: it creates the LoggedModel with an `MlflowClient` in the run's
own experiment and hands its id and the run id to `mlflow.models.Model.log`. The tracking URI, however, is
process-global in MLflow: passing `tracking_uri` sets it for the whole process.

`log_cascade_model` logs the student/teacher cascade (`sparse_distill.cascade`) the same way: both model folders and
a cascade.json (threshold, metric, teacher max_length) as artifacts; its output adds a boolean `deferred` column.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from mlflow.tracking import MlflowClient

from sparse_distill.inference import StudentPredictor, predictions_table

if TYPE_CHECKING:
    from sparse_distill.cascade import CascadePredictor

logger = logging.getLogger(__name__)

TEXT_COLUMN = "text"
LABEL_COLUMN = "label"
PROB_PREFIX = "prob_"
MODEL_DIR_ARTIFACT = "model_dir"
DEFERRED_COLUMN = "deferred"
# The cascade's artifacts: both model folders and its settings.
STUDENT_DIR_ARTIFACT = "student_dir"
TEACHER_DIR_ARTIFACT = "teacher_dir"
CASCADE_CONFIG_ARTIFACT = "cascade_config"
CASCADE_CONFIG_FILE = "cascade.json"
# Distributions the logged model needs at load time (pinned to the installed versions, local suffixes stripped).
REQUIRED_DISTRIBUTIONS = ("mlflow", "torch", "numpy", "numba", "pandas", "pyarrow", "safetensors", "cloudpickle")
CASCADE_EXTRA_DISTRIBUTIONS = ("transformers", "tokenizers")
_EXAMPLE_TEXTS = [
    "a gripping, beautifully acted film",
    "dull and far too long",
    "the plot follows two brothers on a road trip",
]


def _as_texts(model_input: Any) -> list[str]:
    """Raw texts from a DataFrame (`text` column or a single column), a Series, a list or a numpy array of str."""
    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN in model_input.columns:
            values = model_input[TEXT_COLUMN]
        elif model_input.shape[1] == 1:
            values = model_input.iloc[:, 0]
        else:
            raise ValueError(
                f"input DataFrame needs a {TEXT_COLUMN!r} column or exactly one column; got {list(model_input.columns)}"
            )
        values = values.tolist()
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, np.ndarray):
        if model_input.ndim == 2 and model_input.shape[1] == 1:
            model_input = model_input[:, 0]
        if model_input.ndim != 1:
            raise ValueError(f"input array must be 1-D (or one column); got shape {model_input.shape}")
        values = model_input.tolist()
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, list | tuple):
        values = list(model_input)
    elif model_input is None:
        raise ValueError("no input: expected texts (a DataFrame with a 'text' column, a Series, a list or an array)")
    else:
        raise ValueError(f"unsupported input type {type(model_input).__name__}: expected texts")
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
            raise ValueError(f"input row {row}: missing text")
        if not isinstance(value, str):
            raise ValueError(f"input row {row}: expected a string, got {type(value).__name__} ({value!r:.50})")
    return values


def predictions_frame(predictor: StudentPredictor, texts: list[str], batch_size: int = 1024) -> pd.DataFrame:
    """The pyfunc output for texts: column `label` (label values as in the train set) and `prob_<label>` per class."""
    return _frame(predictor.predict_proba(texts, batch_size), predictor.labels)


def cascade_predictions_frame(predictor: CascadePredictor, texts: list[str], batch_size: int = 1024) -> pd.DataFrame:
    """`predictions_frame` of a cascade, plus a boolean column `deferred`: whether the teacher answered the text."""
    probs, deferred = predictor.predict_with_route(texts, batch_size)
    frame = _frame(probs, predictor.labels)
    frame[DEFERRED_COLUMN] = pd.Series(deferred, dtype=bool)
    return frame


def _frame(probs: np.ndarray, labels: list) -> pd.DataFrame:
    return predictions_table(probs, labels)


class _TextsPyfunc(mlflow.pyfunc.PythonModel):
    """A pyfunc model over raw texts: loads its predictor once, then answers with a predictions frame."""

    def __init__(self) -> None:
        self._predictor: Any = None

    def _frame(self, texts: list[str]) -> pd.DataFrame:
        raise NotImplementedError

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Label and class probabilities for each text (and `deferred` for the cascade).

        `model_input`: a DataFrame with a `text` column (or a single column); called directly (`unwrap_python_model()`)
        it also takes a Series, a list or a numpy array of str. Through the pyfunc wrapper the signature applies: pass a
        DataFrame with a `text` column. The hint is `pd.DataFrame` because MLflow reads it:
        a union would trigger type-hint signature inference, which MLflow rejects with a warning.
        """
        if self._predictor is None:
            self.load_context(context)
        return self._frame(_as_texts(model_input))


class StudentPyfunc(_TextsPyfunc):
    """A student model folder served through MLflow's pyfunc interface."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the student from the `model_dir` artifact."""
        self._predictor = StudentPredictor.load(context.artifacts[MODEL_DIR_ARTIFACT])

    def _frame(self, texts: list[str]) -> pd.DataFrame:
        return predictions_frame(self._predictor, texts)


class CascadePyfunc(_TextsPyfunc):
    """The student/teacher cascade served through MLflow's pyfunc interface (see `sparse_distill.cascade`)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load both models from the `student_dir` and `teacher_dir` artifacts, with the settings of cascade.json."""
        from sparse_distill.cascade import CascadePredictor

        settings = json.loads(Path(context.artifacts[CASCADE_CONFIG_ARTIFACT]).read_text())
        self._predictor = CascadePredictor.load(
            context.artifacts[STUDENT_DIR_ARTIFACT],
            context.artifacts[TEACHER_DIR_ARTIFACT],
            threshold=settings["threshold"],
            metric=settings["metric"],
            max_length=settings.get("max_length"),
        )

    def _frame(self, texts: list[str]) -> pd.DataFrame:
        return cascade_predictions_frame(self._predictor, texts)


def pip_requirements(extra: Sequence[str] = ()) -> list[str]:
    """Pinned requirements for the logged model, from the installed versions (local suffixes like +cpu stripped).

    `extra`: distributions needed beyond REQUIRED_DISTRIBUTIONS (the cascade's teacher needs transformers)."""
    reqs = []
    for dist in (*REQUIRED_DISTRIBUTIONS, *extra):
        try:
            version = metadata.version(dist).split("+", 1)[0]
        except metadata.PackageNotFoundError:
            logger.warning("%s is not installed; listing it without a version", dist)
            reqs.append(dist)
            continue
        reqs.append(f"{dist}=={version}")
    return reqs


def tracking_uri_default(project_dir: str | Path) -> str:
    """The project's sqlite tracking store: `sqlite:////abs/path/mlflow.db` (four slashes for an absolute path)."""
    return f"sqlite:///{Path(project_dir).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None, project_dir: str | Path) -> str:
    """The tracking URI to use: the config's, else MLFLOW_TRACKING_URI (set by `make server`'s env.sh), else the
    project's sqlite file."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri_default(project_dir)


def _is_local_store(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri


def ensure_experiment(name: str, tracking_uri: str, artifact_root: str | Path) -> str:
    """The id of experiment `name`, created with `artifact_root` (absolute file URI) as its artifact location if new.

    A deleted experiment of that name is restored. Call it once before fanning out: sqlite locks under parallel writers.
    Against a tracking server (http, https, databricks...) the server's own artifact store is used instead, so
    clients need no disk in common with it.
    """
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifact_location = None
        if _is_local_store(tracking_uri):
            location = Path(artifact_root).resolve()
            location.mkdir(parents=True, exist_ok=True)
            artifact_location = location.as_uri()
        try:
            experiment_id = client.create_experiment(name, artifact_location=artifact_location)
            logger.info("created MLflow experiment %r (id %s), artifacts in %s", name, experiment_id, artifact_location)
            return experiment_id
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # created meanwhile by another process
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
        logger.info("restored deleted MLflow experiment %r (id %s)", name, experiment.experiment_id)
    return experiment.experiment_id


def log_student_model(
    model_dir: str | Path,
    run_id: str,
    tracking_uri: str | None = None,
    artifact_path: str = "student",
    registered_model_name: str | None = None,
) -> str:
    """Log a student model folder as a pyfunc model into the existing run `run_id`; return the model URI.

    Works from any thread, with or without an active run: the run is addressed by id only and never ended. With
    `tracking_uri`, the process-wide tracking URI is set to it first. The returned URI (`models:/m-...`) is accepted by
    `mlflow.pyfunc.load_model`; `runs:/<run_id>/<artifact_path>` resolves to the same model.
    """
    started = time.perf_counter()
    model_dir = Path(model_dir).resolve()

    def example_output(texts: list[str]) -> pd.DataFrame:
        return predictions_frame(StudentPredictor.load(model_dir), texts)

    uri = _log_pyfunc(
        run_id,
        tracking_uri,
        artifact_path,
        registered_model_name,
        python_model=str(Path(__file__).with_name("mlflow_student_model.py")),
        artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
        example_output=example_output,
        model_tag="dan_student",
        requirements=pip_requirements(),
    )
    logger.info("logged student %s into run %s as %s in %.1f s", model_dir, run_id, uri, time.perf_counter() - started)
    return uri


def log_cascade_model(
    student_dir: str | Path,
    teacher_dir: str | Path,
    threshold: float,
    metric: str,
    run_id: str,
    tracking_uri: str | None = None,
    artifact_path: str = "cascade",
    registered_model_name: str | None = None,
    max_length: int | None = None,
) -> str:
    """Log the student/teacher cascade as a pyfunc model into the existing run `run_id`; return the model URI.

    As `log_student_model` (any thread, the run never ended), with both folders as artifacts and a cascade.json holding
    `threshold`, `metric` and the teacher's `max_length` (default: what the teacher folder records, else 128). The
    model's output is `predictions_frame`'s plus a boolean `deferred` column. The folders are checked first: the
    threshold, the metric and the shared label order (a ValueError naming both folders).
    """
    from sparse_distill.cascade import CascadePredictor, teacher_max_length

    started = time.perf_counter()
    student_dir, teacher_dir = Path(student_dir).resolve(), Path(teacher_dir).resolve()
    max_length = max_length or teacher_max_length(teacher_dir)
    # Loaded here, before anything is logged: a bad threshold, metric or label order fails without a half-logged model.
    predictor = CascadePredictor.load(student_dir, teacher_dir, threshold, metric, max_length=max_length)
    settings = {"threshold": predictor.threshold, "metric": predictor.metric, "max_length": max_length}
    with tempfile.TemporaryDirectory(prefix="sparse-distill-cascade-") as tmp:
        config_path = Path(tmp) / CASCADE_CONFIG_FILE
        config_path.write_text(json.dumps(settings, indent=2))
        uri = _log_pyfunc(
            run_id,
            tracking_uri,
            artifact_path,
            registered_model_name,
            python_model=str(Path(__file__).with_name("mlflow_cascade_model.py")),
            artifacts={
                STUDENT_DIR_ARTIFACT: str(student_dir),
                TEACHER_DIR_ARTIFACT: str(teacher_dir),
                CASCADE_CONFIG_ARTIFACT: str(config_path),
            },
            example_output=lambda texts: cascade_predictions_frame(predictor, texts),
            model_tag="cascade",
            # The teacher needs transformers and its tokenizer library at load time too.
            requirements=pip_requirements(CASCADE_EXTRA_DISTRIBUTIONS),
        )
    logger.info(
        "logged cascade (student %s, teacher %s, %s >= %s) into run %s as %s in %.1f s",
        student_dir,
        teacher_dir,
        metric,
        threshold,
        run_id,
        uri,
        time.perf_counter() - started,
    )
    return uri


def _log_pyfunc(
    run_id: str,
    tracking_uri: str | None,
    artifact_path: str,
    registered_model_name: str | None,
    *,
    python_model: str,
    artifacts: dict[str, str],
    example_output: Callable[[list[str]], pd.DataFrame],
    model_tag: str,
    requirements: list[str],
) -> str:
    """Log `python_model` (the path of a models-from-code file) into run `run_id` as a LoggedModel (no active run
    needed); return its model URI.

    The signature is inferred from the example texts and `example_output` of them.
    """
    if tracking_uri is not None and mlflow.get_tracking_uri() != tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)

    example = pd.DataFrame({TEXT_COLUMN: pd.Series(_EXAMPLE_TEXTS, dtype=object)})
    signature = infer_signature(example, example_output(_EXAMPLE_TEXTS))

    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=artifact_path,
        source_run_id=run_id,
        params={k: str(v) for k, v in run.data.params.items()},
        tags={"mlflow.modelFlavor": "python_function", "sparse_distill.model": model_tag},
    )
    info = Model.log(
        artifact_path=None,
        name=artifact_path,
        flavor=mlflow.pyfunc,
        run_id=run_id,
        model_id=logged.model_id,
        registered_model_name=registered_model_name,
        python_model=python_model,
        artifacts=artifacts,
        code_paths=[str(Path(__file__).resolve().parent)],
        signature=signature,
        input_example=example,
        pip_requirements=requirements,
    )
    return info.model_uri
