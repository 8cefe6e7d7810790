"""Checks made before the first expensive stage: every input named in the config exists and is readable, has its
columns, and the dev/test labels occur in train. Each failure names the config key and the file (and row and column
where there is one), in one line, so a bad config fails in a second instead of after the start-up or a stage.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sparse_distill.config import DataConfig, LabelJob, PipelineConfig, VocabJob
from sparse_distill.corpus import check_columns
from sparse_distill.data import DataError, LabelMap, expand_paths, load_split
from sparse_distill.pipeline import corpus_sentence_advice, split_path

logger = logging.getLogger(__name__)


def row_limit_hint(data: DataConfig) -> str:
    """What to add to an error about the train split's labels when `data.max_train_samples` cut it ("" otherwise): it
    keeps the first rows, and on a file sorted by label (IMDB's is) that drops whole labels."""
    if data.max_train_samples is None:
        return ""
    return (
        f" (data.max_train_samples: only the train file's first {data.max_train_samples:,} rows are read, and a file "
        "sorted by label loses whole labels that way; shuffle the file or raise the limit)"
    )


def _keyed(key: str, e: Exception) -> DataError:
    return DataError(f"{key}: {e}")


def _readable(path: str, key: str) -> None:
    if path.startswith("hub:"):
        return
    if not os.path.exists(path):
        raise DataError(f"{key}: {path}: no such file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{key}: {path}: not readable (permission denied)")


def check_teacher(model: str, key: str = "teacher.model") -> None:
    """A teacher given as a path must be a folder; a hub id (`name` or `org/name`) passes only when online."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    # Hub ids are `name` or `org/name` (e.g. roberta-large, FacebookAI/roberta-large).
    looks_local = os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1
    if Path(model).is_dir():
        return
    if Path(model).exists():
        raise DataError(f"{key}: {model}: not a folder (a Hugging Face model folder is expected)")
    if offline or looks_local:
        raise DataError(f"{key}: {model}: no such folder")


def check_pipeline_inputs(cfg: PipelineConfig) -> None:
    """Every input of a pipeline run, before anything slow starts (see the module's docstring)."""
    d = cfg.data
    splits = {}
    for name in ("train", "dev", "test"):
        path = split_path(d, name)
        if path is None:
            continue
        key = f"data.{name}"
        _readable(path, key)
        try:
            splits[name] = load_split(
                path, d.text_column, d.label_column, d.id_column, d.max_train_samples if name == "train" else None
            )
        except DataError as e:
            raise _keyed(key, e) from e
    label_map = LabelMap.from_values(splits["train"].labels or [])
    cut = row_limit_hint(d)
    if label_map.num_classes < 2:
        raise DataError(f"data.train: {splits['train'].source}: column {d.label_column!r} has fewer than 2 labels{cut}")
    for name in ("dev", "test"):
        if name in splits:
            try:
                label_map.encode(splits[name].labels or [], splits[name].source, d.label_column)
            except DataError as e:
                raise _keyed(f"data.{name}", DataError(f"{e}{cut}")) from e
    for i, pattern in enumerate(d.corpus):
        key = f"data.corpus[{i}]"
        try:
            for path in expand_paths([pattern], d.data_dir):
                _readable(path, key)
                check_columns(path, [c for c in (d.text_column, d.id_column) if c])
        except DataError as e:
            raise (e if str(e).startswith(key) else _keyed(key, e)) from e
    check_teacher(cfg.teacher.model)
    # Before hours of labelling documents unlike the task's texts, where the run will not split them itself; the
    # train split is loaded already.
    if d.corpus_split == "none" and (advice := corpus_sentence_advice(d, splits["train"].texts)):
        logger.warning("%s; set data.corpus_split to 'auto' (the default) to split them", advice)
    logger.info(
        "pre-flight checks passed: %s", ", ".join([f"data.{n}" for n in splits] + ["data.corpus"] * bool(d.corpus))
    )


def check_job_inputs(job: LabelJob | VocabJob) -> None:
    """The inputs of a standalone `label` or `vocab` job: files exist, are readable and have their columns."""
    if isinstance(job, LabelJob):
        patterns, flag, columns = job.corpus, "--corpus", [c for c in (job.text_column, job.id_column) if c]
        if not Path(job.teacher).is_dir():
            raise DataError(f"--teacher: {job.teacher}: teacher folder not found")
    else:
        patterns, flag, columns = job.inputs, "--input", [job.text_column]
    for pattern in patterns:
        try:
            for path in expand_paths([pattern]):
                _readable(path, flag)
                check_columns(path, columns)
        except DataError as e:
            raise (e if str(e).startswith(flag) else _keyed(flag, e)) from e
