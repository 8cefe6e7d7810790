"""One Prefect task per pipeline stage.

Cache keys are explicit: the stage fingerprint (its config, its inputs' fingerprints, the library version) and the
run directory (`run_store.stage_key`). Results (small JSON manifests of paths) are persisted, so a re-run of the same
config is served from cache. Each task records its finished stage once in the run store; a stage the store does not
call fresh is re-run (the flow passes `refresh_cache`), and one it calls fresh is never re-run, even where Prefect
has lost its cached result (`_stage_task`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from sparse_distill import pipeline, publishing, run_store
from sparse_distill.config import PipelineConfig
from sparse_distill.data import atomic_write_text
from sparse_distill.mlflow_model import ensure_experiment, resolve_tracking_uri
from sparse_distill.tracking import (
    TrackingRef,
    git_source,
    log_cached_stage,
    log_datasets,
    set_tags,
    stage_run,
    start_parent_run,
)


def _stage_key(stage: str):
    def key(_context, parameters: dict[str, Any]) -> str:
        return run_store.stage_key(parameters["run_dir"], stage, parameters["fingerprints"][stage])

    return key


def _retry_on_io(_task, _task_run, state) -> bool:
    # Retry transient I/O failures only; a bad config or bad data fails at once.
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError)


def _stage_task(stage: str, from_store: bool = True):
    """A stage's task, cached under its stage key.

    With `from_store`, a stage that the run store calls fresh returns its record without running, also when Prefect
    has no cached result for the key (another PREFECT_HOME, a cleared cache, another machine on the same run folder):
    a teacher is not trained again, nor a student, because Prefect forgot them. The label stages opt out: their record
    is cheap to make again, and the flow checks which teacher made them.
    """

    def decorate(fn: Callable[..., dict]):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> dict:
            params = signature.bind(*args, **kwargs).arguments
            run_dir, fingerprint = params["run_dir"], params["fingerprints"][stage]
            record = run_store.fresh_stage(run_dir, stage, fingerprint) if from_store else None
            if record is not None:
                get_run_logger().info("%s: done already in the run folder (its record is fresh); not run again", stage)
                return record
            return fn(*args, **kwargs)

        return task(
            name=stage.replace("_", "-"),
            cache_key_fn=_stage_key(stage),
            persist_result=True,
            retries=2,
            retry_delay_seconds=2,
            retry_condition_fn=_retry_on_io,
        )(run)

    return decorate


def _key(run_dir: str, stage: str, fps: dict[str, str]) -> str:
    return run_store.stage_key(run_dir, stage, fps[stage])


def _done(stage: str, fps: dict[str, str], out: Path, result: dict) -> dict:
    # Recorded once, with the fingerprint, so a later run can tell a finished stage from a stale one.
    return run_store.write_result(out, stage, fps[stage], {**result, "out_dir": str(out)})


@_stage_task("holdout")
def hold_out_dev(
    config: PipelineConfig, run_dir: str, fingerprints: dict[str, str], tracking: TrackingRef | None
) -> dict:
    """Hold part of the train rows out as the dev split, where the config names none (its record says how many)."""
    out = run_store.stage_dir(run_dir, "holdout")
    res = pipeline.run_dev_holdout(config, out)
    get_run_logger().info("dev: %s", res["reason"])
    return _done("holdout", fingerprints, out, res)


@_stage_task("sentences")
def split_corpus(
    config: PipelineConfig, run_dir: str, fingerprints: dict[str, str], tracking: TrackingRef | None
) -> dict:
    """Split the corpus's documents into sentences where `data.corpus_split` says so (its record says why)."""
    out = run_store.stage_dir(run_dir, "sentences")
    res = pipeline.run_corpus_sentences(config, out)
    get_run_logger().info("corpus: %s", res["reason"])
    return _done("sentences", fingerprints, out, res)


@_stage_task("teacher_length")
def choose_teacher_length(
    config: PipelineConfig, run_dir: str, fingerprints: dict[str, str], tracking: TrackingRef | None
) -> dict:
    """Choose the teacher's tokens per text from the task's texts, where `teacher.max_length` is "auto"."""
    out = run_store.stage_dir(run_dir, "teacher_length")
    res = pipeline.run_teacher_length(config)
    get_run_logger().info("teacher.max_length %d: %s", res["max_length"], res["reason"])
    return _done("teacher_length", fingerprints, out, res)


@task(name="start-tracking")
def start_tracking(config: PipelineConfig, run_dir: str, config_fp: str, flow_run_id: str | None) -> TrackingRef:
    """Create (once) the experiment and the pipeline's parent MLflow run."""
    uri = resolve_tracking_uri(config.tracking.tracking_uri, Path.cwd())
    exp_id = ensure_experiment(config.tracking.experiment, uri, Path.cwd() / "mlartifacts")
    tags = {"sparse_distill.run_dir": str(Path(run_dir).resolve()), "sparse_distill.config_fingerprint": config_fp}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    # The code's git commit: the MLflow UI shows it as the run's source (nothing outside a git repository).
    tags.update(git_source(Path(pipeline.__file__).resolve().parent))
    run_id = start_parent_run(uri, exp_id, config.name, config.model_dump(mode="json"), tags)
    get_run_logger().info("MLflow parent run %s in %s", run_id, uri)
    try:
        _log_lineage(config, run_dir, uri, run_id)
    except (MlflowException, OSError) as e:  # lineage is a record of the run, not a reason to stop it
        get_run_logger().warning("MLflow run %s: lineage not logged (%s)", run_id, e)
    return TrackingRef(uri, exp_id, run_id)


def _log_lineage(config: PipelineConfig, run_dir: str, uri: str, run_id: str) -> None:
    """The run's datasets as inputs and its config file as an artifact."""
    from mlflow.tracking import MlflowClient

    lineage_dir = Path(run_dir) / "lineage"
    log_datasets(uri, run_id, pipeline.lineage_datasets(config, lineage_dir))
    client = MlflowClient(uri)
    config_file = Path(run_dir) / "config.yaml"
    if config_file.exists():
        client.log_artifact(run_id, str(config_file))
    if (lineage_dir / "corpus.json").exists():
        client.log_artifact(run_id, str(lineage_dir / "corpus.json"), "lineage")


# Run-store stage -> the name of its nested MLflow run, where the two differ.
TRACKING_NAMES = {"teacher": "finetune-teacher", "kdft": "finetune-student"}


@task(name="log-cached-stages", cache_policy=NO_CACHE)
def log_cached_stages(
    tracking: TrackingRef | None, run_dir: str, fingerprints: dict[str, str], served: list[str]
) -> None:
    """A nested run for each stage served from cache, tagged with its cache key and holding its record; the stages
    that ran tagged their own runs."""
    if tracking is None:
        return
    for stage in served:
        name = TRACKING_NAMES.get(stage, stage.replace("_", "-"))
        log_cached_stage(tracking, name, _key(run_dir, stage, fingerprints), run_store.read_stage(run_dir, stage))


@_stage_task("teacher")
def finetune_teacher(
    config: PipelineConfig, run_dir: str, fingerprints: dict[str, str], tracking: TrackingRef | None
) -> dict:
    """Fine-tune the teacher; returns {'model_dir', 'dev_accuracy', ...}."""
    out = run_store.stage_dir(run_dir, "teacher")
    with stage_run(
        tracking,
        "finetune-teacher",
        {"teacher": config.teacher.model_dump(mode="json")},
        _key(run_dir, "teacher", fingerprints),
    ) as sr:
        res = pipeline.run_finetune_teacher(config, out, sr.log_metrics if sr else None)
        if sr:
            sr.log_metrics(res["steps"], {"teacher_best_dev_accuracy": res["dev_accuracy"]})
    get_run_logger().info("teacher: dev accuracy %.4f", res["dev_accuracy"])
    return _done("teacher", fingerprints, out, res)


def _record_label_task(which: str, what: str, name: str):
    """The task that records one labelling stage's finished shards: `label_<which>`, labelled by the labelling flow
    just before. One body for every labelling stage; each keeps its own task name and cache key."""
    stage = f"label_{which}"

    def record(
        config: PipelineConfig, run_dir: str, fingerprints: dict[str, str], tracking: TrackingRef | None, teacher: dict
    ) -> dict:
        out = run_store.stage_dir(run_dir, stage)
        res = pipeline.finish_label_dir(teacher["model_dir"], out)
        get_run_logger().info("labels (%s): %d docs in %d shards", which, res["rows"], res["shards"])
        return _done(stage, fingerprints, out, res)

    # Distinct names, so Prefect tells the four tasks apart in a flow run.
    record.__name__ = record.__qualname__ = name
    record.__doc__ = f"Record {what} soft labels (labelled by the labelling flow)."
    return _stage_task(stage, from_store=False)(record)


record_train_labels = _record_label_task("train", "the train set's", "record_train_labels")
record_corpus_labels = _record_label_task("corpus", "the corpus's", "record_corpus_labels")
record_transfer_labels = _record_label_task("transfer", "the transfer set's", "record_transfer_labels")
record_hard_transfer_labels = _record_label_task(
    "transfer_hard", "the second transfer round's", "record_hard_transfer_labels"
)


@_stage_task("transfer")
def make_transfer_set(
    config: PipelineConfig, run_dir: str, fingerprints: dict[str, str], tracking: TrackingRef | None
) -> dict:
    """Make the transfer set from the train texts (empty when the corpus is large enough)."""
    out = run_store.stage_dir(run_dir, "transfer")
    with stage_run(
        tracking,
        "transfer",
        {"transfer": config.transfer.model_dump(mode="json")},
        _key(run_dir, "transfer", fingerprints),
    ) as sr:
        res = pipeline.run_transfer(config, out)
        if sr:
            sr.log_metrics(0, {"transfer_rows": res["rows"]})
    get_run_logger().info("transfer set: %d texts (%s)", res["rows"], res["reason"])
    return _done("transfer", fingerprints, out, res)


@_stage_task("transfer_hard")
def make_hard_transfer_set(
    config: PipelineConfig,
    run_dir: str,
    fingerprints: dict[str, str],
    tracking: TrackingRef | None,
    vocab: dict,
    labels: list[dict],
) -> dict:
    """The second transfer round: distil a probe student on the first round's `labels`, keep the new texts it is
    least sure of."""
    out = run_store.stage_dir(run_dir, "transfer_hard")
    params = {"transfer": config.transfer.model_dump(mode="json"), **_train_params(config, "distill")}
    with stage_run(tracking, "transfer_hard", params, _key(run_dir, "transfer_hard", fingerprints)) as sr:
        res = pipeline.run_hard_transfer(
            config, vocab["vocab_dir"], [x["label_dir"] for x in labels], out, sr.log_metrics if sr else None
        )
        if sr:
            sr.log_metrics(0, {"transfer_hard_rows": res["rows"]})
    get_run_logger().info("second transfer round: %d texts (%s)", res["rows"], res["reason"])
    return _done("transfer_hard", fingerprints, out, res)


@_stage_task("vocab")
def make_vocabulary(
    config: PipelineConfig,
    run_dir: str,
    fingerprints: dict[str, str],
    tracking: TrackingRef | None,
    transfer: dict | None = None,
) -> dict:
    """Count n-grams over train + corpus (+ the transfer set's record `transfer`) and keep the top |V|."""
    out = run_store.stage_dir(run_dir, "vocab")
    with stage_run(
        tracking, "vocab", {"vocab": config.vocab.model_dump(mode="json")}, _key(run_dir, "vocab", fingerprints)
    ) as sr:
        res = pipeline.run_vocab(config, out, transfer)
        if sr:
            sr.log_metrics(0, {"vocab_size": res["size"], "distinct_ngrams": res["distinct_ngrams"]})
            sample = out / "vocab_sample.tsv"
            atomic_write_text(sample, _vocab_sample(out))
            sr.log_artifact(str(sample))
    added = res.get("transfer_words", 0)
    get_run_logger().info(
        "vocabulary: kept %d of %d counted n-grams, plus %d new words of the transfer set",
        res["size"] - added,
        res["distinct_ngrams"],
        added,
    )
    return _done("vocab", fingerprints, out, res)


def _vocab_sample(vocab_dir: Path, n: int = 200) -> str:
    import pyarrow.parquet as pq

    table = pq.read_table(vocab_dir / "vocab.parquet").slice(0, n)
    rows = zip(table.column("ngram").to_pylist(), table.column("count").to_pylist(), strict=True)
    return "row\tngram\tcount\n" + "".join(f"{i}\t{g}\t{c}\n" for i, (g, c) in enumerate(rows))


def _train_params(config: PipelineConfig, section: str) -> dict:
    return {
        "student": config.student.model_dump(mode="json"),
        section: getattr(config, section).model_dump(mode="json"),
    }


@_stage_task("distill")
def distill_student(
    config: PipelineConfig,
    run_dir: str,
    fingerprints: dict[str, str],
    tracking: TrackingRef | None,
    vocab: dict,
    labels: list[dict],
) -> dict:
    """Distil the teacher's soft labels into a DAN."""
    out = run_store.stage_dir(run_dir, "distill")
    with stage_run(tracking, "distill", _train_params(config, "distill"), _key(run_dir, "distill", fingerprints)) as sr:
        res = pipeline.run_distill(
            config, vocab["vocab_dir"], [x["label_dir"] for x in labels], out, sr.log_metrics if sr else None
        )
        if sr:
            sr.log_params({"params": res["params"]})
    get_run_logger().info("DAN (KD): dev accuracy %.4f after %d steps", res["dev_accuracy"], res["steps"])
    return _done("distill", fingerprints, out, res)


@_stage_task("kdft")
def finetune_student(
    config: PipelineConfig,
    run_dir: str,
    fingerprints: dict[str, str],
    tracking: TrackingRef | None,
    vocab: dict,
    distilled: dict,
) -> dict:
    """KD+FT: fine-tune the distilled student on the train set."""
    out = run_store.stage_dir(run_dir, "kdft")
    with stage_run(
        tracking, "finetune-student", _train_params(config, "finetune"), _key(run_dir, "kdft", fingerprints)
    ) as sr:
        res = pipeline.run_finetune_student(
            config, vocab["vocab_dir"], distilled["model_dir"], out, sr.log_metrics if sr else None
        )
    get_run_logger().info("DAN (KD+FT): dev accuracy %.4f", res["dev_accuracy"])
    return _done("kdft", fingerprints, out, res)


@_stage_task("scratch")
def train_scratch(
    config: PipelineConfig, run_dir: str, fingerprints: dict[str, str], tracking: TrackingRef | None, vocab: dict
) -> dict:
    """The baseline: the DAN trained on the train set alone."""
    out = run_store.stage_dir(run_dir, "scratch")
    with stage_run(tracking, "scratch", _train_params(config, "scratch"), _key(run_dir, "scratch", fingerprints)) as sr:
        res = pipeline.run_scratch(config, vocab["vocab_dir"], out, sr.log_metrics if sr else None)
    get_run_logger().info("DAN from scratch: dev accuracy %.4f", res["dev_accuracy"])
    return _done("scratch", fingerprints, out, res)


@_stage_task("evaluate")
def evaluate(
    config: PipelineConfig,
    run_dir: str,
    fingerprints: dict[str, str],
    tracking: TrackingRef | None,
    teacher: dict,
    students: dict[str, dict],
) -> dict:
    """Accuracy, macro-F1, confusion matrices and docs/s for the teacher and every student."""
    out = run_store.stage_dir(run_dir, "evaluate")
    with stage_run(
        tracking,
        "evaluate",
        {"evaluate": config.evaluate.model_dump(mode="json")},
        _key(run_dir, "evaluate", fingerprints),
    ) as sr:
        res = pipeline.run_evaluate(config, teacher["model_dir"], {k: v["model_dir"] for k, v in students.items()})
        if sr:
            for name, per_split in res["metrics"].items():
                for split, m in per_split.items():
                    sr.log_metrics(
                        0, {f"{name}_{split}_accuracy": m["accuracy"], f"{name}_{split}_macro_f1": m["macro_f1"]}
                    )
            sr.log_metrics(0, {f"{k}_docs_per_s": v for k, v in res["docs_per_s"].items()})
        # Why the shipped student gets dev texts wrong: the n-grams behind a sample of its errors.
        best = publishing.best_student(students)
        explained = pipeline.explain_dev_errors(config, students[best]["model_dir"], out)
        if sr:
            for path in explained:
                sr.log_artifact(str(path), "explanations")
    return _done("evaluate", fingerprints, out, {**res, "errors_explained": str(explained[0])})


@task(name="tag-mlflow-run", cache_policy=NO_CACHE)
def tag_mlflow_run(config: PipelineConfig, run_id: str, tags: dict[str, str]) -> None:
    """Set tags on a finished MLflow run (e.g. the id of the Prefect flow run that scheduled it)."""
    set_tags(resolve_tracking_uri(config.tracking.tracking_uri, Path.cwd()), run_id, tags)


@task(name="publish-results")
def publish_results(
    config: PipelineConfig,
    run_dir: str,
    config_fp: str,
    tracking: TrackingRef | None,
    evaluation: dict,
    students: dict[str, dict],
) -> dict:
    """Write summary.json, plots and the results table; log them and the best student model to MLflow."""
    logger = get_run_logger()
    summary = publishing.publish_run(config, run_dir, config_fp, tracking, evaluation, students, logger)
    table = pipeline.results_table(summary)
    create_markdown_artifact(
        table + publishing.links_markdown(tracking, summary.get("registry")),
        key="sparse-distill-results",
        description=f"Results of run {config.name}",
    )
    if tracking and tracking.tracking_uri.startswith(("http://", "https://")):
        create_link_artifact(
            publishing.mlflow_run_url(tracking), link_text=f"MLflow run {tracking.parent_run_id}", key="mlflow-run"
        )
    logger.info("results:\n%s", table)
    return summary
