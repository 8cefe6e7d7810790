"""The Sparse Distillation pipeline as Prefect flows: the whole run, and each stage on its own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import get_run_context

from flows.count_flow import count_ngrams_flow
from flows.feature_flow import featurize_labels_flow
from flows.label_flow import label_corpus_flow
from flows.runners import make_task_runner
from sparse_distill import run_store
from sparse_distill.config import LabelJob, PipelineConfig, fingerprint
from sparse_distill.data import atomic_write_text
from sparse_distill.locks import folder_lock
from sparse_distill.pipeline import (
    corpus_split_fingerprint,
    dev_holdout_fingerprint,
    distill_label_stages,
    feature_dirs,
    label_job,
    split_config,
    stage_fingerprints,
    teacher_length_fingerprint,
    transfer_job,
    vocab_job,
    vocab_sources,
)
from sparse_distill.preflight import check_pipeline_inputs
from sparse_distill.run_store import RESULT, is_fresh, read_stage, stage_dir
from sparse_distill.tracking import TrackingRef
from tasks import stages


def resolve_run_dir(config: PipelineConfig, run_dir: str | None) -> str:
    return run_store.resolve_run_dir(config.name, run_dir)


def _flow_run_id() -> str | None:
    try:
        return str(get_run_context().flow_run.id)
    except Exception:  # noqa: BLE001 - outside a flow run there is simply no id
        return None


def _fresh(task, run_dir: str, stage: str, fps: dict[str, str]):
    # Prefect's cached result is only trusted while the run store calls the stage fresh (its files are still there,
    # made for the same fingerprint); otherwise the task runs again.
    return task if is_fresh(run_dir, stage, fps[stage]) else task.with_options(refresh_cache=True)


def _upstream(run_dir: str, stage: str) -> dict:
    result = read_stage(run_dir, stage)
    if result is None:
        raise FileNotFoundError(f"{stage_dir(run_dir, stage)}: stage {stage!r} has not run yet in this run dir")
    return result


@flow(name="sparse-distill-pipeline", log_prints=False)
def pipeline_flow(config: PipelineConfig, run_dir: str | None = None) -> dict[str, Any]:
    """Teacher fine-tuning, labelling, vocabulary, distillation, KD+FT, the baseline, evaluation and publishing."""
    run_dir = resolve_run_dir(config, run_dir)
    check_pipeline_inputs(config)  # before the first stage: names the config key of a missing or bad input
    with folder_lock(run_dir):  # one writer per run directory (re-entrant: the command line may hold it already)
        config = _split_data(config, run_dir)
        atomic_write_text(Path(run_dir) / "config.yaml", _to_yaml(config))  # as the stages run it
        fps = stage_fingerprints(config)
        config_fp = fingerprint(config)
        get_run_logger().info("run dir %s, config fingerprint %s", run_dir, config_fp)
        tracking = stages.start_tracking(config, run_dir, config_fp, _flow_run_id())
        args = {"config": config, "run_dir": run_dir, "fingerprints": fps, "tracking": tracking}
        before = _record_stamps(run_dir, fps)
        teacher, students = _training_stages(config, run_dir, fps, tracking)
        evaluation = _fresh(stages.evaluate, run_dir, "evaluate", fps)(**args, teacher=teacher, students=students)
        stages.log_cached_stages(tracking, run_dir, fps, _served_from_cache(run_dir, fps, before))
        return stages.publish_results(config, run_dir, config_fp, tracking, evaluation, students)


def _record_stamps(run_dir: str, fps: dict[str, str]) -> dict[str, int]:
    """When each fresh stage's record was written (a stage that runs writes it again)."""
    return {
        stage: (stage_dir(run_dir, stage) / RESULT).stat().st_mtime_ns
        for stage in fps
        if is_fresh(run_dir, stage, fps[stage])
    }


def _served_from_cache(run_dir: str, fps: dict[str, str], before: dict[str, int]) -> list[str]:
    """The stages fresh before the run whose records were not rewritten: served from cache, not computed."""
    return [
        stage for stage, stamp in before.items() if _record_stamps(run_dir, {stage: fps[stage]}).get(stage) == stamp
    ]


def _training_stages(
    config: PipelineConfig, run_dir: str, fps: dict[str, str], tracking: TrackingRef | None
) -> tuple[dict, dict[str, dict]]:
    """Teacher, labels, vocabulary, KD, KD+FT and the baseline: each served from cache when already done."""
    args = {"config": config, "run_dir": run_dir, "fingerprints": fps, "tracking": tracking}
    # The transfer set and the vocabulary (which takes the transfer set's new words) need no fine-tuned teacher: made
    # first, then counted while the teacher trains (or first, when counting fans out itself).
    transfer = _transfer_set(config, run_dir, fps, tracking)
    _count_vocab(config, run_dir, fps, transfer)
    vocab_f = _fresh(stages.make_vocabulary, run_dir, "vocab", fps).submit(**args, transfer=transfer)
    teacher = _fresh(stages.finetune_teacher, run_dir, "teacher", fps)(**args)
    labels = _label_stages(config, run_dir, fps, tracking, teacher, transfer)
    vocab = vocab_f.result()
    scratch_f = _fresh(stages.train_scratch, run_dir, "scratch", fps).submit(**args, vocab=vocab)
    labels += _second_round(config, run_dir, fps, tracking, teacher, vocab, labels)
    _featurize(config, run_dir, fps, vocab, labels)
    kd = _fresh(stages.distill_student, run_dir, "distill", fps)(**args, vocab=vocab, labels=labels)
    kdft = _fresh(stages.finetune_student, run_dir, "kdft", fps)(**args, vocab=vocab, distilled=kd)
    return teacher, {"scratch": scratch_f.result(), "kd": kd, "kdft": kdft}


@flow(name="base-stages")
def base_stages_flow(config: PipelineConfig, run_dir: str | None = None) -> dict[str, Any]:
    """The stages the experiments build on (all but evaluation and publishing), with no MLflow run of their own."""
    run_dir = resolve_run_dir(config, run_dir)
    with folder_lock(run_dir):
        config = _split_data(config, run_dir)
        teacher, students = _training_stages(config, run_dir, stage_fingerprints(config), None)
    return {"run_dir": run_dir, "teacher": teacher, "students": students}


def _split_data(config: PipelineConfig, run_dir: str) -> PipelineConfig:
    """The config the stages run with: without a dev split, part of train held out as dev first; where
    `data.corpus_split` says so, the corpus split into sentences; where `teacher.max_length` is "auto", the teacher's
    length chosen from the texts (each a stage of its own, cached); and the config's splits and length replaced by
    what they made."""
    if (fp := dev_holdout_fingerprint(config)) is not None:
        fps = {"holdout": fp}
        _fresh(stages.hold_out_dev, run_dir, "holdout", fps)(config, run_dir, fps, None)
        config = split_config(config, run_dir)
    if (fp := corpus_split_fingerprint(config)) is not None:
        fps = {"sentences": fp}
        _fresh(stages.split_corpus, run_dir, "sentences", fps)(config, run_dir, fps, None)
        config = split_config(config, run_dir)
    if (fp := teacher_length_fingerprint(config)) is not None:
        fps = {"teacher_length": fp}
        _fresh(stages.choose_teacher_length, run_dir, "teacher_length", fps)(config, run_dir, fps, None)
        config = split_config(config, run_dir)
    return config


def _transfer_set(
    config: PipelineConfig, run_dir: str, fps: dict[str, str], tracking: TrackingRef | None
) -> dict | None:
    """The transfer set's record (None when `transfer.size` is 0), made unless already done."""
    if config.transfer.size == 0:
        return None
    args = {"config": config, "run_dir": run_dir, "fingerprints": fps, "tracking": tracking}
    return _fresh(stages.make_transfer_set, run_dir, "transfer", fps)(**args)


def _label_stages(
    config: PipelineConfig,
    run_dir: str,
    fps: dict[str, str],
    tracking: TrackingRef | None,
    teacher: dict,
    transfer: dict | None,
) -> list[dict]:
    """Label the corpus and/or the train set and the transfer set (fanned out by the labelling flow) unless done."""
    which = (["corpus"] if config.data.corpus else []) + (
        ["train"] if config.label.include_train or not config.data.corpus else []
    )
    jobs = [(w, label_job(config, w, teacher["model_dir"], stage_dir(run_dir, f"label_{w}"))) for w in which]
    if transfer and transfer["rows"]:
        # The transfer set is labelled like a corpus (skipped when it came out empty).
        out_dir = stage_dir(run_dir, "label_transfer")
        jobs.append(("transfer", transfer_job(config, transfer["path"], teacher["model_dir"], out_dir)))
    return [_label(config, run_dir, fps, tracking, teacher, w, job) for w, job in jobs]


def _label(
    config: PipelineConfig,
    run_dir: str,
    fps: dict[str, str],
    tracking: TrackingRef | None,
    teacher: dict,
    which: str,
    job: LabelJob,
) -> dict:
    """One labelling stage's record: its shards labelled by the labelling flow first, unless done by this teacher."""
    stage = f"label_{which}"
    fresh = is_fresh(run_dir, stage, fps[stage], teacher.get("teacher_fingerprint"))  # made by this teacher too
    if not fresh:
        _run_labelling(config, job, which, tracking)
    record_task = LABEL_TASKS[stage] if fresh else LABEL_TASKS[stage].with_options(refresh_cache=True)
    return record_task(config=config, run_dir=run_dir, fingerprints=fps, tracking=tracking, teacher=teacher)


def _second_round(
    config: PipelineConfig,
    run_dir: str,
    fps: dict[str, str],
    tracking: TrackingRef | None,
    teacher: dict,
    vocab: dict,
    labels: list[dict],
) -> list[dict]:
    """The second transfer round's labels (none when the config has no second round or it came out empty): the texts
    a probe distilled on the first round's `labels` is least sure of, made and labelled unless done."""
    if "label_transfer_hard" not in distill_label_stages(config):
        return []
    args = {"config": config, "run_dir": run_dir, "fingerprints": fps, "tracking": tracking}
    hard = _fresh(stages.make_hard_transfer_set, run_dir, "transfer_hard", fps)(**args, vocab=vocab, labels=labels)
    if not hard["rows"]:
        return []
    job = transfer_job(config, hard["path"], teacher["model_dir"], stage_dir(run_dir, "label_transfer_hard"))
    return [_label(config, run_dir, fps, tracking, teacher, "transfer_hard", job)]


# The tasks that record a labelling stage once the labelling flow has labelled its shards, by stage name.
LABEL_TASKS = {
    "label_train": stages.record_train_labels,
    "label_corpus": stages.record_corpus_labels,
    "label_transfer": stages.record_transfer_labels,
    "label_transfer_hard": stages.record_hard_transfer_labels,
}


def _run_labelling(config: PipelineConfig, job, which: str, tracking: TrackingRef | None) -> None:
    runner = make_task_runner(config.label)
    label_corpus_flow.with_options(name=f"label-{which}", task_runner=runner)(
        job=job, tracking=tracking, run_name=f"label-{which}"
    )


def _count_vocab(config: PipelineConfig, run_dir: str, fps: dict[str, str], transfer: dict | None) -> None:
    """With several workers or Dask, count the n-grams with the counting flow on that runner; the vocab stage then
    only selects. With one thread, the stage counts by itself, alongside the teacher's training."""
    v = config.vocab
    if not v.fans_out or is_fresh(run_dir, "vocab", fps["vocab"]):
        return
    job = vocab_job(config, stage_dir(run_dir, "vocab"), transfer)
    sources = [asdict(s) for s in vocab_sources(config, transfer)]
    count_ngrams_flow.with_options(name="count-vocab", task_runner=make_task_runner(v))(job=job, sources=sources)


def _featurize(config: PipelineConfig, run_dir: str, fps: dict[str, str], vocab: dict, labels: list[dict]) -> None:
    """With several labelling workers or Dask, featurise the labelled shards with the featurising flow on that runner;
    the distill stage then finds them done. With one thread, the distill stage featurises them by itself."""
    lc = config.label
    if not lc.fans_out or is_fresh(run_dir, "distill", fps["distill"]):
        return
    label_dirs = [x["label_dir"] for x in labels]
    featurize_labels_flow.with_options(name="featurize-labels", task_runner=make_task_runner(lc))(
        label_dirs=label_dirs,
        vocab_dir=vocab["vocab_dir"],
        out_dirs=feature_dirs(label_dirs, stage_dir(run_dir, "distill")),
        retries=lc.retries,
    )


def _to_yaml(config: PipelineConfig) -> str:
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# --- one flow per stage: run a single stage in an existing run directory ---------------------------------------


@contextmanager
def _stage_args(config: PipelineConfig, run_dir: str | None) -> Iterator[dict[str, Any]]:
    """A single stage's arguments, while it holds the run directory's lock."""
    run_dir = resolve_run_dir(config, run_dir)
    with folder_lock(run_dir):
        config = _split_data(config, run_dir)
        yield {"config": config, "run_dir": run_dir, "fingerprints": stage_fingerprints(config), "tracking": None}


@flow(name="finetune-teacher")
def finetune_teacher_flow(config: PipelineConfig, run_dir: str | None = None) -> dict:
    """Fine-tune the teacher only."""
    with _stage_args(config, run_dir) as a:
        return _fresh(stages.finetune_teacher, a["run_dir"], "teacher", a["fingerprints"])(**a)


@flow(name="label")
def label_flow(config: PipelineConfig, run_dir: str | None = None) -> list[dict]:
    """Label the train set and the corpus with the run's fine-tuned teacher."""
    with _stage_args(config, run_dir) as a:
        teacher = _upstream(a["run_dir"], "teacher")
        transfer = _transfer_set(a["config"], a["run_dir"], a["fingerprints"], None)
        return _label_stages(a["config"], a["run_dir"], a["fingerprints"], None, teacher, transfer)


@flow(name="vocab")
def vocab_flow(config: PipelineConfig, run_dir: str | None = None) -> dict:
    """Build the n-gram vocabulary only."""
    with _stage_args(config, run_dir) as a:
        transfer = _transfer_set(a["config"], a["run_dir"], a["fingerprints"], None)
        _count_vocab(a["config"], a["run_dir"], a["fingerprints"], transfer)
        return _fresh(stages.make_vocabulary, a["run_dir"], "vocab", a["fingerprints"])(**a, transfer=transfer)


@flow(name="distill")
def distill_flow(config: PipelineConfig, run_dir: str | None = None) -> dict:
    """Distil into a DAN from the run's soft labels and vocabulary."""
    with _stage_args(config, run_dir) as a:
        # The config says which labels distillation reads; an empty transfer set has no labelling stage.
        wanted = distill_label_stages(a["config"], second_round=False)
        if "label_transfer" in wanted and not _upstream(a["run_dir"], "transfer")["rows"]:
            wanted.remove("label_transfer")
        labels = [_upstream(a["run_dir"], s) for s in wanted]
        vocab = _upstream(a["run_dir"], "vocab")
        teacher = _upstream(a["run_dir"], "teacher")
        labels += _second_round(a["config"], a["run_dir"], a["fingerprints"], None, teacher, vocab, labels)
        _featurize(a["config"], a["run_dir"], a["fingerprints"], vocab, labels)
        return _fresh(stages.distill_student, a["run_dir"], "distill", a["fingerprints"])(
            **a, vocab=vocab, labels=labels
        )


@flow(name="finetune-student")
def finetune_student_flow(config: PipelineConfig, run_dir: str | None = None) -> dict:
    """KD+FT from the run's distilled student, and the from-scratch baseline."""
    with _stage_args(config, run_dir) as a:
        vocab, kd = _upstream(a["run_dir"], "vocab"), _upstream(a["run_dir"], "distill")
        _fresh(stages.train_scratch, a["run_dir"], "scratch", a["fingerprints"])(**a, vocab=vocab)
        return _fresh(stages.finetune_student, a["run_dir"], "kdft", a["fingerprints"])(**a, vocab=vocab, distilled=kd)


@flow(name="evaluate")
def evaluate_flow(config: PipelineConfig, run_dir: str | None = None) -> dict:
    """Evaluate the run's teacher and students and publish the summary."""
    with _stage_args(config, run_dir) as a:
        teacher = _upstream(a["run_dir"], "teacher")
        students = {
            k: _upstream(a["run_dir"], s) for k, s in (("scratch", "scratch"), ("kd", "distill"), ("kdft", "kdft"))
        }
        evaluation = _fresh(stages.evaluate, a["run_dir"], "evaluate", a["fingerprints"])(
            **a, teacher=teacher, students=students
        )
        return stages.publish_results(a["config"], a["run_dir"], fingerprint(a["config"]), None, evaluation, students)


@flow(name="sparse-distill-retrain")
def retrain_flow(config: PipelineConfig, runs_root: str = "runs") -> dict:
    """Scheduled retraining: the whole pipeline in a fresh run directory.

    `config` is the typed pipeline config (a deployment's parameters are validated against it before the run starts).
    Each flow run gets its own directory (`<runs_root>/<name>/<flow-run-id>`), so two runs never write the same one.
    """
    run_id = _flow_run_id() or "manual"
    run_dir = Path(runs_root) / config.name / run_id
    summary = pipeline_flow(config=config, run_dir=str(run_dir))
    if summary.get("mlflow_run_id") and run_id != "manual":
        # The pipeline's own (sub)flow run id is already a tag; this one leads to the deployment's run.
        stages.tag_mlflow_run(config, summary["mlflow_run_id"], {"prefect.root_flow_run_id": run_id})
    return summary
