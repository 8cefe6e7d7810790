"""The pipeline's stages as plain functions: config + input paths in, files and a small record out.

Each stage writes into its own folder and returns its record; the caller (a Prefect task in tasks/) records it once
in the run store (`sparse_distill.run_store`) with the stage's fingerprint. The fingerprints below are the stages'
cache keys.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparse_distill.augment import Origin, TransferSet, make_transfer_copies, nearest_words, replaceable_words
from sparse_distill.code_version import code_fingerprint
from sparse_distill.config import (
    DataConfig,
    DistillLoss,
    LabelConfig,
    LabelJob,
    PipelineConfig,
    TrainConfig,
    VocabConfig,
    VocabJob,
    fingerprint,
)
from sparse_distill.corpus import read_rows
from sparse_distill.counting import run_count_job
from sparse_distill.data import (
    DataError,
    LabelMap,
    TextSplit,
    atomic_write_parquet,
    expand_paths,
    load_split,
    read_table,
    resolve_path,
)
from sparse_distill.evaluation import classification_metrics, measure_throughput, repeat_to
from sparse_distill.features import featurize_labels
from sparse_distill.inference import StudentPredictor
from sparse_distill.run_store import content_fingerprint, file_fingerprint, fresh_stage, read_result, read_stage
from sparse_distill.sentences import far_longer, median_words, sentence_advice, write_sentence_corpus
from sparse_distill.shard_plan import CorpusSource, plan_shards
from sparse_distill.soft_labels import SHARDS, read_manifest, read_soft_labels
from sparse_distill.teacher import (
    LENGTH_SAMPLE,
    LENGTH_SHARE,
    LENGTH_STEP,
    TeacherPredictor,
    auto_max_length,
    finetune_teacher,
    model_token_limit,
    sample_rows,
    teacher_fingerprint,
    teacher_word_vectors,
    training_info,
)
from sparse_distill.training import BatchSource, Budget, InMemoryBatches, SoftLabelStream, train_dan
from sparse_distill.vocab import TOKEN_PATTERN, Subwords, add_words

if TYPE_CHECKING:
    from sparse_distill.tracking import DatasetRecord

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TaskData:
    """The labelled splits of a task and its label map (built from the train set)."""

    train: TextSplit
    dev: TextSplit
    test: TextSplit | None
    label_map: LabelMap

    def encoded(self, split: TextSplit) -> list[int]:
        return self.label_map.encode(split.labels or [], source=split.source)


def split_path(data: DataConfig, name: str) -> str | None:
    value = getattr(data, name)
    return None if value is None else resolve_path(value, data.data_dir)


def corpus_paths(data: DataConfig) -> list[str]:
    return expand_paths(data.corpus, data.data_dir) if data.corpus else []


def corpus_sentence_advice(data: DataConfig, train_texts: list[str] | None = None, sample: int = 1000) -> str | None:
    """`sentences.sentence_advice` on the first `sample` train texts (read unless given) and documents of the first
    corpus file."""
    if not data.corpus:
        return None
    return sentence_advice(*_length_samples(data, train_texts, sample))


def _length_samples(data: DataConfig, train_texts: list[str] | None = None, sample: int = 1000) -> tuple[list, list]:
    """The first `sample` train texts (read unless given) and documents of the first corpus file."""
    if train_texts is None:
        train_texts, _ = read_rows(split_path(data, "train"), 0, sample, data.text_column)
    corpus_texts, _ = read_rows(corpus_paths(data)[0], 0, sample, data.text_column)
    return train_texts[:sample], corpus_texts


SENTENCES_FILE = "sentences.parquet"


def corpus_split_fingerprint(cfg: PipelineConfig) -> str | None:
    """The sentences stage's cache key: the corpus and train files (the decision samples both) and the split
    settings; None when there is no corpus or `data.corpus_split` is "none" (no such stage)."""
    d = cfg.data
    if not d.corpus or d.corpus_split == "none":
        return None
    # The whole corpus is split, whatever max_corpus_samples keeps of it afterwards.
    files = data_fingerprint(d.model_copy(update={"max_corpus_samples": None}), ("train",), corpus=True)
    return fingerprint("sentences", d.corpus_split, files, d.text_column, d.id_column)


def run_corpus_sentences(cfg: PipelineConfig, out_dir: str | Path) -> dict[str, Any]:
    """Split `data.corpus` into one Parquet file of sentences (`SENTENCES_FILE`) when `data.corpus_split` is
    "sentences", or "auto" and its documents are far longer than the train texts (`sentences.far_longer`). The
    record's `corpus` lists the files the later stages read (the sentences, or the corpus as it was) and `reason` says
    why."""
    d = cfg.data
    files = corpus_paths(d)
    task, corpus = (median_words(texts) for texts in _length_samples(d))
    lengths = f"median {corpus:.0f} words a corpus document against {task:.0f} a train text"
    if d.corpus_split == "auto" and not far_longer(task, corpus):
        reason = f"auto: {lengths}, not over 4 times and 60 words, so the documents are labelled whole"
        logger.info("corpus: %s", reason)
        return {"split": False, "corpus": files, "reason": reason}
    out = Path(out_dir).resolve() / SENTENCES_FILE
    logger.info("corpus: splitting %d file(s) into sentences (%s)", len(files), lengths)
    counts = write_sentence_corpus(files, out, d.text_column, d.id_column)
    reason = (
        f"{d.corpus_split}: {lengths}, so split into {counts['sentences']:,} sentences of 5-40 words from "
        f"{counts['documents']:,} documents (a bag of n-grams learns little from a long document's one label)"
    )
    return {"split": True, "corpus": [str(out)], "source": files, "reason": reason, **counts}


def with_corpus_split(cfg: PipelineConfig, record: dict[str, Any]) -> PipelineConfig:
    """The config the later stages run with: its corpus replaced by the sentences stage's file where it split."""
    if not record["split"]:
        return cfg
    data = cfg.data.model_copy(update={"corpus": record["corpus"], "corpus_split": "none"})
    return cfg.model_copy(update={"data": data})


def split_config(cfg: PipelineConfig, run_dir: str | Path) -> PipelineConfig:
    """`cfg` as the stages of the run in `run_dir` ran it: with the holdout stage's train and dev files where that
    stage (fresh for `cfg`) held dev out of train, then with the sentences stage's file as its corpus where that
    stage split the corpus, then with the teacher_length stage's `teacher.max_length` where it was "auto"."""
    fp = dev_holdout_fingerprint(cfg)
    record = fresh_stage(run_dir, "holdout", fp) if fp else None
    cfg = with_dev_holdout(cfg, record) if record else cfg
    fp = corpus_split_fingerprint(cfg)
    record = fresh_stage(run_dir, "sentences", fp) if fp else None
    cfg = with_corpus_split(cfg, record) if record else cfg
    fp = teacher_length_fingerprint(cfg)
    record = fresh_stage(run_dir, "teacher_length", fp) if fp else None
    return with_teacher_length(cfg, record) if record else cfg


# A held-out dev split larger than this buys little precision and costs every dev evaluation (the teacher's most).
DEV_HOLDOUT_MAX_ROWS = 5000


def dev_holdout_fingerprint(cfg: PipelineConfig) -> str | None:
    """The holdout stage's cache key: the train file, its columns and row limit, and the share held out; None when
    the config names a dev split (no such stage)."""
    d = cfg.data
    if d.dev is not None:
        return None
    return fingerprint("holdout", data_fingerprint(d, ("train",)), d.dev_holdout, DEV_HOLDOUT_MAX_ROWS)


def holdout_rows(labels: list[Any], share: float, max_rows: int = DEV_HOLDOUT_MAX_ROWS, seed: int = 0) -> list[int]:
    """The sorted rows to hold out as dev: `share` of each label's rows (rounded, at most all but one of them, so
    every label keeps a train row), scaled down to `max_rows` in all; drawn with `seed`, so always the same rows."""
    by_label: dict[Any, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    share = min(share, max_rows / max(len(labels), 1))
    rng = np.random.default_rng(seed)
    rows: list[int] = []
    for label in sorted(by_label, key=str):
        members = by_label[label]
        take = min(round(share * len(members)), len(members) - 1)
        rows.extend(rng.choice(members, size=take, replace=False).tolist())
    if len(rows) > max_rows:  # rounding per label can pass the cap by a few rows
        rows = rng.choice(rows, size=max_rows, replace=False).tolist()
    return sorted(rows)


def run_dev_holdout(cfg: PipelineConfig, out_dir: str | Path) -> dict[str, Any]:
    """Hold `data.dev_holdout` of the train rows out as the dev split (`holdout_rows`): writes the rows kept as
    `train.parquet` and the rows held out as `dev.parquet` in `out_dir`, every column as it was. The record's `train`
    and `dev` are the files the later stages read, and `reason` says what was held out."""
    d = cfg.data
    path = split_path(d, "train")
    assert path is not None  # the config requires a train split
    # load_split validates the texts and labels and names the file and row of a bad one.
    labels = load_split(path, d.text_column, d.label_column, d.id_column, d.max_train_samples).labels or []
    table = read_table(path).slice(0, len(labels))
    held = holdout_rows(labels, d.dev_holdout)
    if not held:
        raise DataError(
            f"{path}: {len(labels)} train rows leave none to hold out as dev (data.dev_holdout {d.dev_holdout}): "
            "give data.dev a dev split"
        )
    kept = np.setdiff1d(np.arange(len(labels)), held)
    out = Path(out_dir).resolve()
    # Each file is written whole (temp file, then rename); the stage counts as done only once its record is written.
    dev_file = atomic_write_parquet(table.take(pa.array(held)), out / "dev.parquet")
    train_file = atomic_write_parquet(table.take(pa.array(kept)), out / "train.parquet")
    reason = (
        f"data.dev unset: {len(held):,} of {len(labels):,} train rows held out as dev (data.dev_holdout "
        f"{d.dev_holdout:g} of each label's rows, at most {DEV_HOLDOUT_MAX_ROWS:,}), {len(kept):,} left to train on"
    )
    logger.info("dev: %s", reason)
    return {
        "train": str(train_file),
        "dev": str(dev_file),
        "train_rows": len(kept),
        "dev_rows": len(held),
        "reason": reason,
    }


def with_dev_holdout(cfg: PipelineConfig, record: dict[str, Any]) -> PipelineConfig:
    """The config the later stages run with: train and dev replaced by the holdout stage's files (the row limit is
    already applied to them)."""
    data = cfg.data.model_copy(update={"train": record["train"], "dev": record["dev"], "max_train_samples": None})
    return cfg.model_copy(update={"data": data})


def teacher_length_fingerprint(cfg: PipelineConfig) -> str | None:
    """The teacher_length stage's cache key: the train and dev files, the teacher's tokenizer (by name) and the cap;
    None when `teacher.max_length` is a number (no such stage)."""
    t = cfg.teacher
    if t.max_length != "auto":
        return None
    files = data_fingerprint(cfg.data, ("train", "dev"))
    return fingerprint("teacher_length", files, t.model, t.max_length_cap, LENGTH_SHARE, LENGTH_STEP, LENGTH_SAMPLE)


def run_teacher_length(cfg: PipelineConfig) -> dict[str, Any]:
    """Choose `teacher.max_length` from the task's texts (`teacher.auto_max_length`) on a seeded sample of
    LENGTH_SAMPLE train and dev texts each. The record's `max_length` is what the later stages read; `reason` says
    why."""
    from transformers import AutoTokenizer

    d = cfg.data
    splits: dict[str, list[str]] = {}
    for name in ("train", "dev"):
        path = split_path(d, name)
        if path is None:
            continue
        limit = d.max_train_samples if name == "train" else None
        texts = load_split(path, d.text_column, None, None, limit).texts
        splits[name] = [texts[i] for i in sample_rows(len(texts), LENGTH_SAMPLE, seed=0)]
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher.model)
    cap = cfg.teacher.max_length_cap
    model_limit = model_token_limit(cfg.teacher.model, tokenizer) or cap
    length, reason = auto_max_length(tokenizer, splits, min(cap, model_limit))
    if model_limit < cap:
        reason += f" (the model's limit {model_limit:,}, under teacher.max_length_cap {cap:,})"
    logger.info("teacher.max_length %d: %s", length, reason)
    return {"max_length": length, "reason": reason}


def with_teacher_length(cfg: PipelineConfig, record: dict[str, Any]) -> PipelineConfig:
    """The config the later stages run with: `teacher.max_length` the teacher_length stage's number."""
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"max_length": record["max_length"]})})


def load_task_data(data: DataConfig) -> TaskData:
    """Load train/dev/test, build the label map from train, and check every dev/test label is known."""
    train = load_split(
        split_path(data, "train"), data.text_column, data.label_column, data.id_column, data.max_train_samples
    )
    dev_path = split_path(data, "dev")
    if dev_path is None:
        # Only a run holds dev out of train (its holdout stage); its config.yaml names the files it made.
        raise DataError("data.dev: no dev split given; read the run's config.yaml (`split_config`), which names it")
    dev = load_split(dev_path, data.text_column, data.label_column, data.id_column)
    test_path = split_path(data, "test")
    test = load_split(test_path, data.text_column, data.label_column, data.id_column) if test_path else None
    label_map = LabelMap.from_values(train.labels or [])
    if label_map.num_classes < 2:
        raise DataError(f"{train.source}: column {data.label_column!r} has fewer than 2 distinct labels")
    out = TaskData(train, dev, test, label_map)
    out.encoded(dev)
    if test is not None:
        out.encoded(test)
    return out


def data_fingerprint(data: DataConfig, splits: tuple[str, ...] = ("train", "dev", "test"), corpus: bool = False) -> str:
    """Fingerprint of the named splits' files (by content: `run_store.content_fingerprint`) and the column settings."""
    files = {s: content_fingerprint(p) for s in splits if (p := split_path(data, s))}
    if corpus:
        files["corpus"] = [content_fingerprint(p) for p in corpus_paths(data)]
    cols = data.model_dump(
        include={"text_column", "label_column", "id_column", "max_train_samples", "max_corpus_samples"}
    )
    # A row limit counts only where its data does: the teacher's key must not move with max_corpus_samples (a
    # retrained teacher, for nothing), nor the corpus labels' with max_train_samples. Pinned to None rather than
    # dropped, so that keys made with the limits unset stay as they were.
    if "train" not in splits:
        cols["max_train_samples"] = None
    if not corpus:
        cols["max_corpus_samples"] = None
    return fingerprint(files, cols)


def _rows(path: str, limit: int | None) -> int | None:
    """A file's row count (streaming; Parquet from its footer), or None when it cannot be counted here."""
    from sparse_distill.corpus import index_rows

    if path.startswith("hub:"):
        return None  # counting would download it
    try:
        return index_rows(path, 1 << 40, limit).rows
    except (OSError, ValueError) as e:
        logger.warning("%s: rows not counted (%s)", path, e)
        return None


def lineage_datasets(cfg: PipelineConfig, out_dir: str | Path) -> list[DatasetRecord]:
    """The run's data as MLflow dataset inputs: train, dev, test and the corpus, each with its source, digest (our
    file fingerprint) and row count. The corpus, possibly many files, is described by a manifest written to
    `out_dir/corpus.json` (each file's fingerprint and rows), which is its source; no text is loaded."""
    from sparse_distill.data import atomic_write_text
    from sparse_distill.tracking import DatasetRecord

    d = cfg.data
    out: list[DatasetRecord] = []
    for split in ("train", "dev", "test"):
        if (path := split_path(d, split)) is None:
            continue
        rows = _rows(path, d.max_train_samples if split == "train" else None)
        out.append(DatasetRecord(Path(path).name, split, path, fingerprint(file_fingerprint(path)), rows))
    files = corpus_paths(d)
    if files:
        listed = [{**file_fingerprint(p), "rows": _rows(p, d.max_corpus_samples)} for p in files]
        known = [f["rows"] for f in listed if f["rows"] is not None]
        total = sum(known) if len(known) == len(listed) else None
        manifest = Path(out_dir) / "corpus.json"
        atomic_write_text(manifest, json.dumps({"files": listed, "rows": total}, indent=2))
        digest = fingerprint([file_fingerprint(p) for p in files])
        out.append(DatasetRecord(f"corpus ({len(files)} files)", "corpus", str(manifest), digest, total))
    return out


def student_key(cfg: PipelineConfig) -> dict[str, Any]:
    """The student section as it enters cache keys."""
    return cfg.student.cache_dump()


def distill_label_stages(cfg: PipelineConfig, second_round: bool = True) -> list[str]:
    """The labelling stages whose soft labels the distill stage reads (the transfer sets' only when they are not
    empty, which their own stages decide); `second_round=False`: those the second round's probe reads."""
    stages = ["label_corpus"] if cfg.data.corpus else []
    if cfg.label.include_train or not cfg.data.corpus:
        stages.append("label_train")
    if cfg.transfer.size != 0:
        stages.append("label_transfer")
        if second_round and cfg.transfer.hard_size != 0:
            stages.append("label_transfer_hard")
    return stages


# The code each training and evaluation stage runs (see sparse_distill.code_version): a change to it recomputes the
# stage even under an unchanged config, where the training algorithm changes most. The stages before them (teacher
# fine-tuning, both transfer rounds, labelling, vocabulary) are left out on purpose: their outputs are data checked by
# content (the teacher's weights, shard and vocabulary checksums), and a library upgrade must not silently redo hours
# of labelling or counting (an operator upgrading to get past a failing shard keeps the shards already labelled).
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "distill": ("training", "pipeline:run_distill", "pipeline:distill_stream", "pipeline:gold_targets"),
    "kdft": ("training", "pipeline:run_finetune_student"),
    "scratch": ("training", "pipeline:run_scratch"),
    "evaluate": (
        "evaluation",
        "explanation",
        "inference",
        "teacher",
        "baselines",
        "pipeline:run_evaluate",
    ),
}


def stage_fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """Cache keys of every stage: its own config, its inputs' fingerprints, the library version and, for the students
    and evaluation, the code they run (`STAGE_CODE`).

    Changing one stage's config changes its key and the keys of the stages that depend on it, nothing else.
    """
    code = {stage: code_fingerprint(*names) for stage, names in STAGE_CODE.items()}
    fp: dict[str, str] = {}
    fp["teacher"] = fingerprint("teacher", data_fingerprint(cfg.data, ("train", "dev")), cfg.teacher.cache_dump())
    label_cfg = cfg.label.model_dump(exclude={"include_train", *LabelConfig.RUNTIME_FIELDS})
    fp["label_train"] = fingerprint("label_train", fp["teacher"], label_cfg, data_fingerprint(cfg.data, ("train",)))
    fp["label_corpus"] = fingerprint(
        "label_corpus", fp["teacher"], label_cfg, data_fingerprint(cfg.data, (), corpus=True)
    )
    # Neighbour replacement and the teacher's words read the teacher's backbone (by name: a hub id or a local folder).
    backbone = cfg.teacher.model if "neighbour" in cfg.transfer.methods or cfg.transfer.teacher_words else None
    # The background sentences enter by content (an "auto" file that appears later changes the keys); without them
    # the keys are those of runs made before they existed.
    background = background_key(cfg)
    fp["transfer"] = fingerprint(
        "transfer",
        cfg.transfer.first_round_dump(),
        data_fingerprint(cfg.data, ("train",), corpus=True),
        backbone,
        *([{"background": background}] if background else []),
    )
    vocab_cfg = cfg.vocab.model_dump(exclude=VocabConfig.RUNTIME_FIELDS)
    counted = [data_fingerprint(cfg.data, ("train",), corpus=True)]
    if cfg.transfer.size != 0:
        counted += ["new words of the transfer set", fp["transfer"]]
    fp["vocab"] = fingerprint("vocab", vocab_cfg, TOKEN_PATTERN, *counted)
    fp["label_transfer"] = fingerprint("label_transfer", fp["teacher"], label_cfg, fp["transfer"])
    # The second round: its probe is distilled like the KD student on the first round's labels.
    fp["transfer_hard"] = fingerprint(
        "transfer_hard",
        cfg.transfer.cache_dump(),
        fp["vocab"],
        [fp[stage] for stage in distill_label_stages(cfg, second_round=False)],
        student_key(cfg),
        cfg.distill,
        data_fingerprint(cfg.data, ("train", "dev")),
        backbone,
    )
    fp["label_transfer_hard"] = fingerprint("label_transfer_hard", fp["teacher"], label_cfg, fp["transfer_hard"])
    uses = [fp[stage] for stage in distill_label_stages(cfg)]
    fp["distill"] = fingerprint(
        "distill",
        fp["vocab"],
        uses,
        student_key(cfg),
        cfg.distill,
        data_fingerprint(cfg.data, ("dev",)),
        code["distill"],
    )
    fp["kdft"] = fingerprint(
        "kdft", fp["distill"], _without_gold(cfg.finetune), data_fingerprint(cfg.data, ("train", "dev")), code["kdft"]
    )
    fp["scratch"] = fingerprint(
        "scratch",
        fp["vocab"],
        student_key(cfg),
        _without_gold(cfg.scratch),
        data_fingerprint(cfg.data, ("train", "dev")),
        code["scratch"],
    )
    fp["evaluate"] = fingerprint(
        "evaluate",
        fp["teacher"],
        fp["scratch"],
        fp["distill"],
        fp["kdft"],
        cfg.evaluate,
        data_fingerprint(cfg.data),
        code["evaluate"],
    )
    return fp


# --- stages -------------------------------------------------------------------------------------------------------


def run_finetune_teacher(cfg: PipelineConfig, out_dir: str | Path, on_metrics: MetricsCallback | None = None) -> dict:
    """Fine-tune the teacher on train, keep the best dev checkpoint."""
    data = load_task_data(cfg.data)
    res = finetune_teacher(
        cfg.teacher,
        data.train.texts,
        data.encoded(data.train),
        data.dev.texts,
        data.encoded(data.dev),
        data.label_map,
        out_dir,
        on_metrics,
    )
    return {
        "model_dir": res.model_dir,
        "dev_accuracy": res.dev_accuracy,
        "best_step": res.best_step,
        "steps": res.steps,
        "seconds": res.seconds,
        "budget": res.budget,
        "teacher_fingerprint": teacher_fingerprint(res.model_dir),
    }


def label_sources(cfg: PipelineConfig, which: str) -> list[CorpusSource]:
    """What a labelling stage reads: the train split, or the corpus files."""
    d = cfg.data
    if which == "train":
        return [CorpusSource(split_path(d, "train"), d.text_column, d.id_column, d.max_train_samples)]
    return [CorpusSource(p, d.text_column, d.id_column, d.max_corpus_samples) for p in corpus_paths(d)]


def transfer_job(cfg: PipelineConfig, transfer_file: str, teacher_dir: str, out_dir: str | Path) -> LabelJob:
    """The labelling job of the transfer set: its one Parquet file, labelled like a corpus."""
    return LabelJob(
        teacher=teacher_dir,
        corpus=[transfer_file],
        out=str(out_dir),
        text_column="text",
        id_column="id",
        max_length=cfg.teacher.max_length,
        replan=True,
        label=cfg.label,
    )


def label_job(cfg: PipelineConfig, which: str, teacher_dir: str, out_dir: str | Path) -> LabelJob:
    """The labelling job of a pipeline stage: the train split or the corpus files, into `out_dir`.

    `replan`: when the data changed, the stage's fingerprint changed too, so its old labels are stale.
    """
    d = cfg.data
    files = [split_path(d, "train")] if which == "train" else corpus_paths(d)
    limit = d.max_train_samples if which == "train" else d.max_corpus_samples
    return LabelJob(
        teacher=teacher_dir,
        corpus=files,
        out=str(out_dir),
        text_column=d.text_column,
        id_column=d.id_column,
        limit=limit,
        max_length=cfg.teacher.max_length,
        replan=True,
        label=cfg.label,
    )


def finish_label_dir(teacher_dir: str, out_dir: str | Path) -> dict:
    """Check that every shard of a labelling stage is done for this teacher; returns the stage's record."""
    from sparse_distill.labelling import label_status, pending_shards, read_manifest

    manifest = read_manifest(out_dir)
    fp = teacher_fingerprint(teacher_dir)
    pending = pending_shards(out_dir, manifest, fp)
    if pending:
        raise DataError(f"{out_dir}: {len(pending)} shards are not labelled by this teacher yet: {pending[:10]}")
    status = label_status(out_dir)
    return {
        "label_dir": str(out_dir),
        "rows": status["rows_written"],
        "shards": status["shards"],
        "teacher_fingerprint": fp,
    }


def vocab_job(cfg: PipelineConfig, out_dir: str | Path, transfer: dict | None = None) -> VocabJob:
    """The counting job of the pipeline's vocab stage: train split + corpus (+ the background sentences of the transfer
    set's record `transfer`) into `out_dir`.

    `replan`: when the data or n-gram settings changed, the stage's fingerprint changed too, so old counts are stale.
    """
    sources = vocab_sources(cfg, transfer)
    return VocabJob(
        inputs=[s.path for s in sources],
        out=str(out_dir),
        text_column=cfg.data.text_column,
        replan=True,
        vocab=cfg.vocab,
    )


def vocab_sources(cfg: PipelineConfig, transfer: dict | None = None) -> list[CorpusSource]:
    """What the vocabulary is counted over: the train split and the corpus, each with its row limit, and the background
    sentences the transfer set took (`transfer`: its stage record), which are real texts like a corpus's."""
    sources = label_sources(cfg, "train") + label_sources(cfg, "corpus")
    if transfer and transfer.get("background"):
        sources.append(CorpusSource(transfer["background_path"], "text", None, transfer["background"]))
    return sources


def run_vocab(cfg: PipelineConfig, out_dir: str | Path, transfer: dict | None = None) -> dict:
    """Count n-grams over train + corpus (+ the transfer set's background sentences) and keep the top |V| (only
    selects if already counted); then add the words of the transfer set (`transfer`: its stage record) that the
    vocabulary lacks.

    The transfer set's made texts are not counted: most of their other n-grams are seams of its edits (mixed texts,
    swapped words), and at the |V| cut they would push out n-grams the train set really has. Its new words are what
    it brings (the teacher's words, neighbour replacements), and they get rows after the counted n-grams.
    """
    res = run_count_job(vocab_job(cfg, out_dir, transfer), sources=vocab_sources(cfg, transfer))
    added = 0
    if transfer and transfer.get("rows"):
        texts = pq.read_table(transfer["path"], columns=["text"]).column("text").to_pylist()
        added = add_words(out_dir, texts)
    subwords = Subwords.from_config(cfg.vocab)  # the counting job wrote them to vocab.json; here for the record
    return {
        "vocab_dir": str(out_dir),
        "size": res["size"] + added,
        "subword_buckets": subwords.buckets if subwords else 0,
        "distinct_ngrams": res["distinct_ngrams"],
        "transfer_words": added,
    }


TRANSFER_FILE = "transfer.parquet"


def transfer_size(cfg: PipelineConfig, train_rows: int, corpus_rows: int) -> tuple[int, str]:
    """How many transfer texts to make, and why (an explicit `transfer.size` wins)."""
    t = cfg.transfer
    if t.size is not None:
        return t.size, "transfer.size set"
    copies = t.copies_per_text * train_rows
    wanted = max(copies, t.min_documents) if train_rows else 0
    floor = f", at least transfer.min_documents {t.min_documents:,}," if wanted > copies else ""
    size = min(t.max_size, max(0, wanted - corpus_rows))
    return size, (
        f"auto: {t.copies_per_text} distillation documents per train row ({copies:,}){floor} wanted ({wanted:,}), "
        f"the corpus has {corpus_rows:,}, so {size:,} transfer texts (at most transfer.max_size {t.max_size:,})"
    )


# Where `make install` (and `sparse-distill demo-data`) writes the background sentences that `transfer.background:
# auto` reads: from the working folder, as the shipped configs name their teacher, else from this package's checkout
# (a run started elsewhere). The environment variable moves it (the tests point it nowhere, so that a checkout's own
# file does not enter their runs).
BACKGROUND_FILE = Path("data/demo/background.parquet")
BACKGROUND_ENV = "SPARSE_DISTILL_BACKGROUND"
_CHECKOUT = Path(__file__).resolve().parent.parent


def auto_background_file() -> Path:
    """The file `transfer.background: auto` reads: `$SPARSE_DISTILL_BACKGROUND`, else `BACKGROUND_FILE` in the working
    folder, else in the checkout this package is installed from (editable), where that one exists."""
    if os.environ.get(BACKGROUND_ENV):
        return Path(os.environ[BACKGROUND_ENV])
    checkout = _CHECKOUT / BACKGROUND_FILE
    return checkout if not BACKGROUND_FILE.is_file() and checkout.is_file() else BACKGROUND_FILE


def background_path(cfg: PipelineConfig) -> str | None:
    """The background sentences' file `transfer.background` names ("auto": `BACKGROUND_FILE` where it exists), or None.
    A file named explicitly must exist."""
    value = cfg.transfer.background
    if value is None or cfg.transfer.size == 0:
        return None
    if value == "auto":
        found = auto_background_file()
        return str(found) if found.is_file() else None
    if not Path(value).is_file():
        raise DataError(f"transfer.background: {value} is not a file (a Parquet file with a `text` column)")
    return value


def background_key(cfg: PipelineConfig) -> dict[str, Any] | None:
    """The background sentences as they enter cache keys: the file's content and the size setting; None without."""
    path = background_path(cfg)
    return None if path is None else {"file": content_fingerprint(path), "size": cfg.transfer.background_size}


class BackgroundChoice(NamedTuple):
    """The background sentences a transfer set takes: the first `rows` of `path`, and why."""

    rows: int
    path: str | None
    reason: str


def background_size(cfg: PipelineConfig, train_rows: int, corpus_rows: int) -> BackgroundChoice:
    """How many of the background file's first sentences join the transfer set, from which file, and why."""
    t = cfg.transfer
    path = background_path(cfg)
    if path is None:
        if t.background is None or t.size == 0:
            return BackgroundChoice(0, None, "no background sentences (transfer.background off)")
        missing = f"transfer.background auto: {auto_background_file()} not made by `make install` or demo-data"
        return BackgroundChoice(0, None, f"no background sentences ({missing})")
    rows = _rows(path, None)
    if rows is None or "text" not in pq.read_schema(path).names:
        raise DataError(f"transfer.background: {path} is not a Parquet file with a `text` column")
    if t.background_size is not None:
        size = min(t.background_size, rows)
        return BackgroundChoice(size, path, f"{size:,} background sentences of {path}")
    wanted = max(t.copies_per_text * train_rows, t.min_documents) if train_rows else 0
    size = min(rows, max(0, wanted - corpus_rows))
    return BackgroundChoice(
        size,
        path,
        f"{size:,} background sentences of {path} (auto: the {wanted:,} distillation documents wanted less the "
        f"corpus's {corpus_rows:,}, at most the file's {rows:,})",
    )


def _train_texts_and_corpus_rows(cfg: PipelineConfig) -> tuple[TextSplit, int]:
    """The train texts the transfer rounds are made from, and how many corpus rows their auto size counts."""
    train = load_split(split_path(cfg.data, "train"), cfg.data.text_column, None, None, cfg.data.max_train_samples)
    sources = label_sources(cfg, "corpus")
    return train, plan_shards(sources, 1 << 30).total_rows if sources else 0


def run_transfer(cfg: PipelineConfig, out_dir: str | Path) -> dict:
    """Make the transfer set (`transfer.parquet`: id, text, and the train rows each text was made from) from the train
    texts; empty when none is needed."""
    train, corpus_rows = _train_texts_and_corpus_rows(cfg)
    size, reason = transfer_size(cfg, len(train.texts), corpus_rows)
    t = cfg.transfer
    words, neighbours = _teacher_words(cfg, train.texts) if size else ([], None)
    made = _transfer_copies(cfg, train.texts, size, t.seed, neighbours)
    texts, origins = list(made.texts), list(made.origins)
    ids = [f"transfer:{i}" for i in range(len(texts))]
    if t.teacher_words and words:
        # Each word the teacher knows, alone: its soft label tells the student what the word means for the task,
        # also for words the train set never has (the student has rows only for what it is trained on).
        ids += [f"word:{w}" for w in words]
        texts += words
        origins += [()] * len(words)
        reason += f", plus the teacher's {len(words):,} whole words as one-word texts"
    background = background_size(cfg, len(train.texts), corpus_rows) if size else BackgroundChoice(0, None, "")
    if background.rows:
        # Real sentences of no particular domain: the teacher's labels on them carry what it makes of words and
        # phrases the train set lacks, in context (teacher's labels only: they come from no train row).
        found, _ = read_rows(background.path, 0, background.rows, "text")
        ids += [f"background:{i}" for i in range(len(found))]
        texts += found
        origins += [()] * len(found)
        reason += f", plus {background.reason}"
    atomic_write_parquet(transfer_table(ids, texts, origins), Path(out_dir) / TRANSFER_FILE)
    logger.info("transfer set: %d texts (%s)", len(texts), reason)
    return {
        "path": str(Path(out_dir) / TRANSFER_FILE),
        "rows": len(texts),
        "reason": reason,
        "background": background.rows,
        "background_path": background.path if background.rows else None,
    }


# A transfer file's columns: the texts the teacher labels (id, text) and, per text, the train rows it was made from and
# the share of its words taken from each (empty for a text made from none, such as the teacher's words).
SOURCE_ROWS, SOURCE_SHARES = "source_rows", "source_shares"


def transfer_table(ids: list[str], texts: list[str], origins: list[Origin]) -> pa.Table:
    """A transfer file's table: id, text, and each text's train rows with their shares."""
    return pa.table(
        {
            "id": ids,
            "text": texts,
            SOURCE_ROWS: pa.array([[r for r, _ in o] for o in origins], pa.list_(pa.int32())),
            SOURCE_SHARES: pa.array([[w for _, w in o] for o in origins], pa.list_(pa.float32())),
        }
    )


def _teacher_words(cfg: PipelineConfig, train_texts: list[str]) -> tuple[list[str], dict[str, list[str]] | None]:
    """The teacher's whole words (for `transfer.teacher_words`) and the train words' nearest words among them (for
    neighbour replacement), each only when the transfer settings use them."""
    t = cfg.transfer
    if "neighbour" not in t.methods and not t.teacher_words:
        return [], None
    # The teacher's backbone gives the words and their vectors: fine-tuning barely moves input embeddings, and
    # this way the transfer set (and the vocabulary counted over it) need not wait for the teacher's training.
    words, vectors = teacher_word_vectors(cfg.teacher.model)
    if "neighbour" not in t.methods:
        return words, None
    neighbours = nearest_words(words, vectors, sorted(replaceable_words(train_texts)), t.neighbours)
    logger.info("transfer set: %d train words have neighbours in the teacher's vocabulary", len(neighbours))
    return words, neighbours


def _transfer_copies(
    cfg: PipelineConfig, train_texts: list[str], size: int, seed: int, neighbours: dict[str, list[str]] | None
) -> TransferSet:
    """`size` texts made from the train texts by the transfer set's methods, with `seed`, and their train rows."""
    t = cfg.transfer
    return make_transfer_copies(
        train_texts, size, t.methods, seed, t.alpha, t.dropout, neighbours=neighbours, replace_rate=t.replace_rate
    )


# Second round candidates are made, scored and mostly dropped this many at a time, so memory holds one chunk.
HARD_CHUNK = 100_000


def hard_transfer_size(cfg: PipelineConfig, train_rows: int, corpus_rows: int) -> tuple[int, str]:
    """How many second-round texts to keep, and why (an explicit `transfer.hard_size` wins)."""
    t = cfg.transfer
    if t.size == 0:
        return 0, "no transfer set (transfer.size 0)"
    if t.hard_size is not None:
        return t.hard_size, "transfer.hard_size set"
    size, _ = transfer_size(cfg, train_rows, corpus_rows)
    return size, f"auto: as many as the transfer set's {size:,} generated texts"


def run_hard_transfer(
    cfg: PipelineConfig,
    vocab_dir: str,
    label_dirs: list[str],
    out_dir: str | Path,
    on_metrics: MetricsCallback | None = None,
) -> dict:
    """The second transfer round (`transfer.parquet`: id, text): new texts, part of them those a first student is
    least sure of.

    A student distilled like the KD student on the labels so far (`label_dirs`; the probe, in `out_dir/probe`) scores
    `transfer.hard_pool` candidates per text kept for its doubt, made from the train texts like the transfer set (with
    the next seeds); those with the smallest margin between the probe's two likeliest classes are kept (ids `hard:i`).
    Where the probe is sure, a teacher's label mostly repeats what it has learnt; where it is unsure are the word
    combinations it has not (on SST-2 with 5,000 rows: +1.4 points of KD over as many random candidates; README).
    `transfer.hard_share` of the round is kept so; the rest are candidates taken as made, at random (ids `random:i`),
    because where the teacher is as unsure of those texts as the probe (Rotten Tomatoes), a round of them alone teaches
    noise.
    """
    train, corpus_rows = _train_texts_and_corpus_rows(cfg)
    size, reason = hard_transfer_size(cfg, len(train.texts), corpus_rows)
    record: dict[str, Any] = {"path": str(Path(out_dir) / TRANSFER_FILE), "rows": 0, "reason": reason}
    texts: list[str] = []
    at_random: list[str] = []
    origins: list[Origin] = []
    random_origins: list[Origin] = []
    if size:
        probe = run_distill(cfg, vocab_dir, label_dirs, Path(out_dir) / "probe", on_metrics, stage="transfer_hard")
        predictor = StudentPredictor.load(probe["model_dir"])
        _, neighbours = _teacher_words(cfg, train.texts)
        doubted = max(1, round(size * cfg.transfer.hard_share))
        random_rows = size - doubted
        # The first candidates made are the random part (they are made at random); the probe scores the rest.
        wanted = random_rows + doubted * cfg.transfer.hard_pool
        margins = np.zeros(0, np.float32)
        for start in range(0, wanted, HARD_CHUNK):
            # Each chunk its own seed (the first round used transfer.seed), so chunks do not repeat each other.
            made = _transfer_copies(
                cfg, train.texts, min(HARD_CHUNK, wanted - start), cfg.transfer.seed + 1 + start, neighbours
            )
            chunk, chunk_origins = made.texts, made.origins
            taken = max(0, min(len(chunk), random_rows - len(at_random)))
            at_random, chunk = at_random + chunk[:taken], chunk[taken:]
            random_origins, chunk_origins = random_origins + chunk_origins[:taken], chunk_origins[taken:]
            if chunk:
                pooled, pooled_origins = texts + chunk, origins + chunk_origins
                pooled_margins = np.concatenate([margins, class_margins(predictor.predict_proba(chunk))])
                keep = _least_sure(pooled_margins, doubted)
                texts, origins = [pooled[i] for i in keep], [pooled_origins[i] for i in keep]
                margins = pooled_margins[keep]
            logger.info("second round: %d of %d candidates made", min(start + HARD_CHUNK, wanted), wanted)
        reason += (
            f"; of {wanted:,} candidates, the {len(texts):,} the probe (dev accuracy {probe['dev_accuracy']:.3f}) is "
            f"least sure of (transfer.hard_pool {cfg.transfer.hard_pool} per text, margin at most "
            f"{float(margins.max()):.3f}) and {len(at_random):,} at random (transfer.hard_share "
            f"{cfg.transfer.hard_share:g})"
        )
        record.update(
            probe_dev_accuracy=probe["dev_accuracy"],
            probe_steps=probe["steps"],
            candidates=wanted,
            least_sure=len(texts),
            max_margin=float(margins.max()),
        )
    ids = [f"hard:{i}" for i in range(len(texts))] + [f"random:{i}" for i in range(len(at_random))]
    table = transfer_table(ids, texts + at_random, origins + random_origins)
    atomic_write_parquet(table, Path(out_dir) / TRANSFER_FILE)
    logger.info("second round: %d texts (%s)", len(ids), reason)
    return {**record, "rows": len(ids), "reason": reason}


def class_margins(probs: np.ndarray) -> np.ndarray:
    """Each row's margin between its two likeliest classes (small: the model is unsure between them)."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]).astype(np.float32)


def _least_sure(margins: np.ndarray, n: int) -> np.ndarray:
    """The rows of the `n` smallest margins (ties: the earlier row), in their order."""
    if len(margins) <= n:
        return np.arange(len(margins))
    return np.sort(np.argsort(margins, kind="stable")[:n])


def _train_stage(
    cfg: PipelineConfig,
    vocab_dir: str,
    out_dir: str | Path,
    data_source: Callable[[TaskData], BatchSource],
    train_cfg: TrainConfig,
    init_model: str | None,
    on_metrics: MetricsCallback | None,
    prefix: str,
    stage: str,
    loss: DistillLoss = "kl",
) -> dict:
    data = load_task_data(cfg.data)
    res = train_dan(
        out_dir,
        vocab_dir,
        data_source(data),
        data.dev.texts,
        data.encoded(data.dev),
        data.label_map,
        cfg.student,
        train_cfg,
        init_model=init_model,
        on_metrics=on_metrics,
        metric_prefix=prefix,
        # A checkpoint left in the stage folder resumes only the stage it was made for.
        resume_key=stage_fingerprints(cfg)[stage],
        loss=loss,
    )
    return res


def _gold(train_cfg: TrainConfig) -> Callable[[TaskData], BatchSource]:
    """The train set's gold labels as one-hot targets, shuffled with the stage's seed."""
    return lambda d: InMemoryBatches.from_labels(
        d.train.texts, d.encoded(d.train), d.label_map.num_classes, train_cfg.seed
    )


# The distill stage's featurised label shards, inside its own folder.
FEATURES_DIR = "features"


def feature_dirs(label_dirs: list[str], out_dir: str | Path) -> list[str]:
    """Where the distill stage in `out_dir` keeps the n-gram ids of each labelling folder's shards."""
    return [str(Path(out_dir) / FEATURES_DIR / Path(d).name) for d in label_dirs]


def run_distill(
    cfg: PipelineConfig,
    vocab_dir: str,
    label_dirs: list[str],
    out_dir: str | Path,
    on_metrics: MetricsCallback | None = None,
    stage: str = "distill",
) -> dict:
    """Distil the teacher's soft labels into a fresh DAN (streamed from the label shards); `stage`: the stage whose
    key resumes a checkpoint left in `out_dir` (the second round's probe is distilled like this too).

    The labelled documents are featurised once, into `out_dir/features/<label folder>` (resumable, shard by shard;
    see `sparse_distill.features`; the pipeline flow fans the shards out over the labelling runner first when it has
    several workers), and every epoch reads their n-gram ids from there instead of their texts.
    """
    pairs = zip(label_dirs, feature_dirs(label_dirs, out_dir), strict=True)
    features = [str(featurize_labels(d, vocab_dir, f)) for d, f in pairs]
    stream = lambda data: distill_stream(cfg, data, label_dirs, features)  # noqa: E731
    prefix = "kd_" if stage == "distill" else "probe_"
    return _train_stage(cfg, vocab_dir, out_dir, stream, cfg.distill, None, on_metrics, prefix, stage, cfg.distill.loss)


def distill_stream(cfg: PipelineConfig, data: TaskData, label_dirs: list[str], features: list[str]) -> SoftLabelStream:
    """The distill stage's batches: the label folders' soft labels over their stored n-gram ids (`features`, one
    folder per label folder); the targets of the train rows and of the transfer texts made from them mixed with their
    gold labels by `distill.gold_weight` (`gold_targets`)."""
    gold = gold_targets(cfg, data, label_dirs) if cfg.distill.gold_weight > 0 else {}
    return SoftLabelStream(
        label_dirs,
        cfg.distill.shuffle_buffer,
        cfg.distill.seed,
        feature_dirs=features,
        gold=gold,
        gold_weight=cfg.distill.gold_weight,
    )


def gold_targets(cfg: PipelineConfig, data: TaskData, label_dirs: list[str]) -> dict[str, np.ndarray]:
    """Gold target distributions for `distill.gold_weight`, keyed by label folder, one row per labelled document in
    file order: the train set's one-hot labels, and for a transfer set each text's mix of the gold labels of the train
    rows it was made from (by their share of its words; a row of zeros where it was made from none, such as the
    teacher's one-word texts, whose targets stay the teacher's). Each shard's ids are checked against its file's rows.
    A transfer file from before its texts kept their train rows has them found by making its texts again
    (`_remade_origins`), or gets no gold targets where that fails (a warning says so)."""
    train_path = Path(label_sources(cfg, "train")[0].path).resolve()
    onehot = np.zeros((len(data.train), data.label_map.num_classes), np.float32)
    onehot[np.arange(len(data.train)), data.encoded(data.train)] = 1.0
    out: dict[str, np.ndarray] = {}
    for d in label_dirs:
        plan = read_manifest(d)
        paths = [Path(src.path).resolve() for src in plan.sources]
        if paths == [train_path]:
            ids, targets = data.train.ids, onehot
        elif len(paths) == 1 and paths[0].name == TRANSFER_FILE:
            found = _transfer_gold(cfg, paths[0], onehot)
            if found is None:
                continue
            ids, targets = found
        else:
            continue
        for shard in plan.shards:
            shard_ids, _ = read_soft_labels(Path(d) / SHARDS / shard.name)
            if shard.stop > len(ids) or shard_ids != ids[shard.start : shard.stop]:
                raise DataError(
                    f"{Path(d) / SHARDS / shard.name}: ids differ from rows {shard.start}-{shard.stop} of {paths[0]} "
                    "(the file changed since it was labelled); label it again"
                )
        out[d] = targets
    return out


def _transfer_gold(cfg: PipelineConfig, path: Path, onehot: np.ndarray) -> tuple[list[str], np.ndarray] | None:
    """A transfer file's ids and its texts' gold targets (see `gold_targets`); None where its train rows are unknown."""
    names = pq.read_schema(path).names
    if SOURCE_ROWS in names and SOURCE_SHARES in names:
        table = pq.read_table(path, columns=["id", SOURCE_ROWS, SOURCE_SHARES])
        ids = table.column("id").to_pylist()
        rows_col, shares_col = table.column(SOURCE_ROWS).combine_chunks(), table.column(SOURCE_SHARES).combine_chunks()
        rows = rows_col.flatten().to_numpy().astype(np.int64)
        shares = shares_col.flatten().to_numpy().astype(np.float32)
        # Row i of the file owns entries offsets[i]:offsets[i+1] of the flattened lists.
        owner = np.repeat(np.arange(len(ids)), np.diff(rows_col.offsets.to_numpy()))
    else:
        table = pq.read_table(path, columns=["id", "text"])
        ids = table.column("id").to_pylist()
        origins = _remade_origins(cfg, path, ids, table.column("text").to_pylist())
        if origins is None:
            logger.warning(
                "%s was made before transfer texts kept their train rows, and making it again does not give its "
                "texts: they keep the teacher's labels alone (make the transfer set again to mix in gold labels)",
                path,
            )
            return None
        owner = np.repeat(np.arange(len(ids)), [len(o) for o in origins])
        rows = np.array([r for o in origins for r, _ in o], np.int64)
        shares = np.array([w for o in origins for _, w in o], np.float32)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(onehot)):
        raise DataError(
            f"{path}: {SOURCE_ROWS} names train row {int(rows.max())}, but the train set has {len(onehot)} rows "
            "(the train set changed since the transfer set was made); make it again"
        )
    targets = np.zeros((len(ids), onehot.shape[1]), np.float32)
    np.add.at(targets, owner, shares[:, None] * onehot[rows])
    return ids, targets


def _remade_origins(cfg: PipelineConfig, path: Path, ids: list[str], texts: list[str]) -> list[Origin] | None:
    """The train rows of a transfer file written before the files kept them, found by making its texts again (the
    generator is seeded, so the same config gives the same texts) rather than by labelling a new file: a first round
    is made again whole and must equal the file; a second round's candidates are made again (as many as its record
    says) and each kept text is looked up among them. None where a text is not found."""
    train, _ = _train_texts_and_corpus_rows(cfg)
    try:
        _, neighbours = _teacher_words(cfg, train.texts)
    except OSError as err:  # the teacher's backbone is gone: its neighbour words cannot be made again
        logger.warning("%s: the teacher's words for making it again: %s", path, err)
        return None
    seed = cfg.transfer.seed
    if not any(i.startswith(("hard:", "random:")) for i in ids):
        made = sum(1 for i in ids if i.startswith("transfer:"))
        copies = _transfer_copies(cfg, train.texts, made, seed, neighbours)
        if copies.texts != texts[:made]:
            return None
        return list(copies.origins) + [()] * (len(ids) - made)
    wanted = int((read_result(path.parent) or {}).get("candidates", 0))
    found: dict[str, Origin] = {}
    for start in range(0, wanted, HARD_CHUNK):
        chunk = _transfer_copies(cfg, train.texts, min(HARD_CHUNK, wanted - start), seed + 1 + start, neighbours)
        for text, origin in zip(chunk.texts, chunk.origins, strict=True):
            found.setdefault(text, origin)
    if any(t not in found for t in texts):
        return None
    logger.info("%s: the train rows of its %d texts found among %d candidates made again", path, len(texts), wanted)
    return [found[t] for t in texts]


def _without_gold(section: TrainConfig) -> TrainConfig:
    """A gold-label stage's section as it enters its cache key: `gold_weight` and `loss` only act in distillation, so
    they stay out (a new weight or loss does not retrain the baseline or KD+FT for nothing; KD+FT's key holds KD's)."""
    added = TrainConfig.ADDED_FIELDS
    return section.model_copy(update={"gold_weight": added["gold_weight"], "loss": added["loss"]})


def run_finetune_student(
    cfg: PipelineConfig, vocab_dir: str, init_model: str, out_dir: str | Path, on_metrics: MetricsCallback | None = None
) -> dict:
    """KD+FT: fine-tune the distilled student on the train set's gold labels."""
    return _train_stage(
        cfg, vocab_dir, out_dir, _gold(cfg.finetune), cfg.finetune, init_model, on_metrics, "kdft_", "kdft"
    )


def run_scratch(
    cfg: PipelineConfig, vocab_dir: str, out_dir: str | Path, on_metrics: MetricsCallback | None = None
) -> dict:
    """The baseline: the same DAN trained on the train set alone."""
    return _train_stage(
        cfg, vocab_dir, out_dir, _gold(cfg.scratch), cfg.scratch, None, on_metrics, "scratch_", "scratch"
    )


def run_evaluate(cfg: PipelineConfig, teacher_dir: str, students: dict[str, str]) -> dict:
    """Accuracy and macro-F1 on dev (and test) for the teacher and each student; throughput; the summary."""
    data = load_task_data(cfg.data)
    splits = {"dev": data.dev, **({"test": data.test} if data.test is not None else {})}
    teacher = TeacherPredictor(teacher_dir, max_length=cfg.teacher.max_length)
    predictors: dict[str, Any] = {"teacher": teacher}
    predictors.update({name: StudentPredictor.load(path) for name, path in students.items()})
    metrics: dict[str, dict[str, dict]] = {}
    for name, pred in predictors.items():
        metrics[name] = {}
        for split_name, split in splits.items():
            probs = pred.predict_proba(split.texts)
            metrics[name][split_name] = classification_metrics(
                probs.argmax(1), np.asarray(data.encoded(split)), data.label_map.num_classes
            )
            logger.info("%s %s accuracy %.4f", name, split_name, metrics[name][split_name]["accuracy"])
    timing_texts = (data.test or data.dev).texts
    speed = {
        "teacher": measure_throughput(
            teacher.predict_proba,
            repeat_to(timing_texts, cfg.evaluate.teacher_speed_docs),
            cfg.evaluate.batch_size,
            cfg.evaluate.threads,
        ),
    }
    for name in students:
        speed[name] = measure_throughput(
            predictors[name].predict_proba,
            repeat_to(timing_texts, cfg.evaluate.speed_docs),
            cfg.evaluate.batch_size,
            cfg.evaluate.threads,
        )
    evaluation = {"metrics": metrics, "docs_per_s": speed, "labels": list(data.label_map.labels)}
    if cfg.evaluate.fasttext and (fasttext := _evaluate_fasttext(cfg, data, splits, timing_texts)):
        evaluation["baselines"] = {"fasttext": fasttext}
    return evaluation


def _evaluate_fasttext(cfg: PipelineConfig, data: TaskData, splits: dict, timing_texts: list[str]) -> dict | None:
    """fastText trained on the run's train rows: its metrics on each split, its speed, its settings (None, with a
    warning, where the binding is not installed: the run goes on without the row)."""
    from sparse_distill.baselines import FASTTEXT_SETTINGS, FastTextBaseline

    try:
        model = FastTextBaseline.train(data.train.texts, data.encoded(data.train), data.label_map.num_classes)
    except ImportError as e:
        logger.warning("no fastText row: its binding is not installed (%s; pip install fasttext-wheel)", e)
        return None
    out: dict[str, Any] = {"settings": dict(FASTTEXT_SETTINGS)}
    for split_name, split in splits.items():
        probs = model.predict_proba(split.texts)
        gold = np.asarray(data.encoded(split))
        out[split_name] = classification_metrics(probs.argmax(1), gold, data.label_map.num_classes)
        logger.info("fasttext %s accuracy %.4f", split_name, out[split_name]["accuracy"])
    texts = repeat_to(timing_texts, cfg.evaluate.speed_docs)
    out["docs_per_s"] = measure_throughput(model.predict_proba, texts, cfg.evaluate.batch_size, cfg.evaluate.threads)
    return out


# Dev errors of the shipped student explained by the evaluate stage, and n-grams shown for each.
ERROR_SAMPLE = 20
ERROR_TOP_NGRAMS = 5


def explain_dev_errors(cfg: PipelineConfig, model_dir: str, out_dir: str | Path) -> list[Path]:
    """A seeded sample of the student's dev errors with the n-grams behind each wrong prediction:
    `errors_explained.json` and `.md` in `out_dir`."""
    from sparse_distill.explanation import explain_errors, write_error_explanations

    dev = load_task_data(cfg.data).dev
    report = explain_errors(
        StudentPredictor.load(model_dir), dev.texts, dev.labels or [], ERROR_SAMPLE, ERROR_TOP_NGRAMS, seed=0
    )
    return write_error_explanations(report, out_dir)


def run_choices(cfg: PipelineConfig, run_dir: str | Path) -> dict[str, str]:
    """What the shipped defaults chose for this run and why: the dev split where train gave it, the teacher's length
    and budget, the table, the corpus and the transfer set, each student's budget."""
    out: dict[str, str] = {}
    holdout = read_stage(run_dir, "holdout") or {}
    if holdout.get("dev") == cfg.data.dev:  # this run's dev split came out of that stage
        out["dev"] = holdout["reason"]
    length = read_stage(run_dir, "teacher_length") or {}
    if length.get("max_length") == cfg.teacher.max_length:  # this run's length came out of that stage
        out["teacher_length"] = f"teacher.max_length {length['max_length']}: {length['reason']}"
    teacher_stage = read_stage(run_dir, "teacher") or {}
    if budget := teacher_stage.get("budget"):
        out["budget_teacher"] = f"teacher: {budget}"
    if cfg.teacher.pooling == "auto" and teacher_stage.get("model_dir"):
        chosen = training_info(teacher_stage["model_dir"]).get("pooling")
        why = {
            "mean": "the model's classifier read a BERT-style pooler; its head reads the mean of the token states",
            "model": "the model has no BERT-style pooler to replace; its own head",
        }
        if chosen in why:
            out["teacher_pooling"] = f"teacher.pooling auto: {chosen} ({why[chosen]})"
    vocab = read_stage(run_dir, "vocab")
    if vocab:
        added = vocab.get("transfer_words", 0)
        size, counted, distinct = vocab["size"], vocab["size"] - added, vocab["distinct_ngrams"]
        why = (
            f"the top {counted:,} of {distinct:,} counted n-grams (vocab.size)"
            if counted >= cfg.vocab.size
            else f"every counted n-gram with count >= {cfg.vocab.min_count} (vocab.size {cfg.vocab.size:,} not filled)"
        )
        if added:
            why += f", plus {added:,} words of the transfer set that they lack"
        if buckets := vocab.get("subword_buckets", 0):
            subwords = Subwords(cfg.vocab.subword_min, cfg.vocab.subword_max, buckets)
            why += f", plus {subwords.describe()} (vocab.subword_buckets)"
        out["table"] = f"|V| = {size + buckets:,}: {why}; d = {cfg.student.dim} (student.dim)"
        if (k := cfg.student.member_count) > 1:
            width = cfg.student.dim // k
            out["table"] += (
                f", shared by {k} members of {width} column{'s' if width > 1 else ''} each (student.members): {k} DANs "
                "trained one after another with their own seeds, predicting the mean of their probabilities"
            )
    # An in-domain corpus is the lever the quality benchmark found (README, sst2-corpus): say so where there is none.
    if not cfg.data.corpus:
        out["corpus"] = (
            "none (data.corpus empty): KD learns from the train set and the transfer texts only; unlabelled texts "
            "of the task's domain are what lifted the student most (README: 'Quality against fastText')"
        )
    elif corpus := read_stage(run_dir, "label_corpus"):
        out["corpus"] = f"{corpus['rows']:,} unlabelled texts labelled by the teacher (data.corpus)"
        split = read_stage(run_dir, "sentences") or {}
        try:
            if split.get("corpus") == corpus_paths(cfg.data):  # this run's corpus came out of that stage
                out["corpus"] += f"; data.corpus_split {split['reason']}"
            elif advice := corpus_sentence_advice(cfg.data):
                out["corpus"] += f"; {advice} (data.corpus_split is 'none')"
        except (DataError, OSError) as e:  # a corpus moved since it was labelled: the summary goes on without advice
            logger.warning("corpus: not sampled for the summary (%s)", e)
    transfer = read_stage(run_dir, "transfer") if cfg.transfer.size != 0 else None
    out["transfer"] = f"{transfer['rows']:,} texts: {transfer['reason']}" if transfer else "none (transfer.size 0)"
    if "label_transfer_hard" in distill_label_stages(cfg) and (hard := read_stage(run_dir, "transfer_hard")):
        out["transfer_hard"] = f"{hard['rows']:,} texts: {hard['reason']}"
    for stage, name in (("distill", "KD"), ("kdft", "KD+FT"), ("scratch", "scratch")):
        record = read_stage(run_dir, stage) or {}
        if b := record.get("budget"):
            stop = f", stopped early, best at step {record['best_step']}" if b["early_stopped"] else ""
            budget = Budget(b["steps"], b["eval_every"], b["epochs"], b["reason"])
            out[f"budget_{stage}"] = f"{name}: {budget.describe(stop)}"
            if members := record.get("members"):
                alone = ", ".join(f"{m['dev_accuracy']:.3f}" for m in members)
                together = record["dev_accuracy"]
                out[f"budget_{stage}"] += f"; per member (dev accuracy alone {alone}, together {together:.3f})"
    return out


def build_summary(
    cfg: PipelineConfig,
    evaluation: dict,
    students: dict[str, dict],
    best_student: str,
    mlflow_run_id: str | None,
    config_fp: str,
    choices: dict[str, str] | None = None,
) -> dict:
    """The output contract of a pipeline run (`summary.json`); `choices` says what the defaults chose and why."""
    m, speed = evaluation["metrics"], evaluation["docs_per_s"]
    names = {"teacher": "teacher", "scratch": "student_scratch", "kd": "student_kd", "kdft": "student_kdft"}
    summary: dict[str, Any] = {"run_name": cfg.name}
    for split in ("dev", "test"):
        suffix = "" if split == "dev" else "_test"
        for key, label in names.items():
            if key in m and split in m[key]:
                summary[f"{label}_accuracy{suffix}"] = m[key][split]["accuracy"]
                summary[f"{label}_macro_f1{suffix}"] = m[key][split]["macro_f1"]
    best_acc = m[best_student]["dev"]["accuracy"]
    summary["best_student"] = best_student
    summary["retention"] = best_acc / m["teacher"]["dev"]["accuracy"] if m["teacher"]["dev"]["accuracy"] else None
    if "test" in m["teacher"]:
        summary["retention_test"] = m[best_student]["test"]["accuracy"] / max(m["teacher"]["test"]["accuracy"], 1e-12)
    summary["teacher_docs_per_s"] = speed["teacher"]
    summary["student_docs_per_s"] = speed[best_student]
    summary["speedup"] = speed[best_student] / speed["teacher"]
    params = students[best_student]["params"]
    summary["student_params"] = params["total"]
    summary["student_params_detail"] = params
    summary["student_model_dir"] = students[best_student]["model_dir"]
    if fasttext := evaluated_fasttext(evaluation):
        summary.update(_against_fasttext(m, fasttext, best_student))
    summary["mlflow_run_id"] = mlflow_run_id
    summary["config_fingerprint"] = config_fp
    summary["choices"] = choices or {}
    summary["findings"] = teacher_findings(m, best_student, evaluated_fasttext(evaluation))
    for finding in summary["findings"]:
        logger.warning("%s", finding)
    return summary


# The distilled students' short names: in the findings, and in the quality benchmark's table.
STUDENT_SHORT = {"kd": "KD", "kdft": "KD+FT"}


def teacher_findings(metrics: dict, best_student: str, fasttext: dict | None) -> list[str]:
    """Where dev accuracy says the teacher is the run's weak link, in words a user can act on: a teacher no better
    than the DAN trained on the gold labels alone, or within LEAD_MARGIN of fastText; and a shipped student under the
    DAN from scratch. Empty when none applies."""
    dev = {name: split["dev"]["accuracy"] for name, split in metrics.items() if "dev" in split}
    teacher, student = dev["teacher"], dev[best_student]
    out: list[str] = []
    # The DAN from scratch learns the gold labels in the student's own form. A teacher under it can still help (its
    # labels of the transfer texts, mixed with gold ones: sotu-eras, README), but it is the weak link of the run.
    if (scratch := dev.get("scratch")) is not None and teacher <= scratch:
        out.append(
            f"the teacher ({teacher:.3f} on dev) is not ahead of the DAN trained on the gold labels alone "
            f"({scratch:.3f}): the student learns from it what it knows, and a teacher that leads that DAN is what "
            "would lift the student most: more fine-tuning passes (teacher.epochs), more tokens per text "
            "(teacher.max_length), or a larger model (teacher.model)"
        )
    if scratch is not None and student < scratch:
        out.append(
            f"the shipped student ({STUDENT_SHORT.get(best_student, best_student)}, {student:.3f} on dev) is under "
            f"the DAN from scratch ({scratch:.3f}), which has the same form and speed: it is in students/scratch/model"
        )
    if fasttext is not None and "dev" in fasttext and teacher - fasttext["dev"]["accuracy"] <= LEAD_MARGIN:
        ft = fasttext["dev"]["accuracy"]
        out.append(
            f"the teacher ({teacher:.3f} on dev) leads fastText ({ft:.3f}) by {LEAD_MARGIN * 100:.0f} points or less: "
            "a student distilled from it can lead fastText by little more"
        )
    return out


# The teacher must lead fastText by more than this for the share of its lead the student keeps to mean anything.
LEAD_MARGIN = 0.02
# The run's own fastText (evaluate.fasttext) in the results table and on the model cards.
FASTTEXT_TITLE = "fastText (word bigrams, 25 epochs)"


def evaluated_fasttext(evaluation: dict) -> dict | None:
    """The fastText the evaluate stage trained (`evaluate.fasttext`): its metrics per split and speed; None where it
    did not (turned off, the binding missing, or an evaluation from before it)."""
    return (evaluation.get("baselines") or {}).get("fasttext")


def _against_fasttext(metrics: dict, fasttext: dict, best_student: str) -> dict[str, Any]:
    """fastText's figures for the summary, and how the shipped student and the teacher compare with it (on test where
    there is one): the points each is ahead, and the share of the teacher's lead the student keeps."""
    out: dict[str, Any] = {}
    for split, suffix in (("dev", ""), ("test", "_test")):
        if split in fasttext:
            out[f"fasttext_accuracy{suffix}"] = fasttext[split]["accuracy"]
            out[f"fasttext_macro_f1{suffix}"] = fasttext[split]["macro_f1"]
    out["fasttext_docs_per_s"] = fasttext["docs_per_s"]
    split = "test" if "test" in fasttext and "test" in metrics["teacher"] else "dev"
    ft = fasttext[split]["accuracy"]
    student, teacher = metrics[best_student][split]["accuracy"], metrics["teacher"][split]["accuracy"]
    out["fasttext_split"] = split
    out["student_over_fasttext"] = student - ft
    out["teacher_over_fasttext"] = teacher - ft
    out["lead_kept"] = (student - ft) / (teacher - ft) if teacher - ft > LEAD_MARGIN else None
    return out


def _fasttext_line(summary: dict) -> str:
    """One line of the results: the shipped student and the teacher against fastText."""
    student, teacher = 100 * summary["student_over_fasttext"], 100 * summary["teacher_over_fasttext"]
    line = (
        f"against fastText ({summary['fasttext_split']}): student {student:+.1f} points, teacher {teacher:+.1f}"
        f"  |  fastText {summary['fasttext_docs_per_s']:.0f} docs/s"
    )
    if summary.get("lead_kept") is not None:
        return line + f"  |  the student keeps {100 * summary['lead_kept']:.0f} % of the teacher's lead"
    return line + f"  |  the teacher leads by {LEAD_MARGIN * 100:.0f} points or less: no lead to keep"


def results_table(summary: dict) -> str:
    """A markdown table of the summary: one row per model, dev and test accuracy, speed."""
    rows = [
        ("Teacher", "teacher"),
        ("DAN from scratch", "student_scratch"),
        ("DAN (KD)", "student_kd"),
        ("DAN (KD+FT)", "student_kdft"),
    ]
    if "fasttext_accuracy" in summary:
        rows.append((FASTTEXT_TITLE, "fasttext"))
    lines = ["| model | dev acc | dev macro-F1 | test acc |", "|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for title, key in rows:
        lines.append(
            f"| {title} | {fmt(summary.get(f'{key}_accuracy'))} | {fmt(summary.get(f'{key}_macro_f1'))} | "
            f"{fmt(summary.get(f'{key}_accuracy_test'))} |"
        )
    lines.append("")
    lines.append(
        f"retention (dev, {summary['best_student']}): {summary['retention']:.3f}  |  "
        f"teacher {summary['teacher_docs_per_s']:.0f} docs/s, student {summary['student_docs_per_s']:.0f} "
        f"docs/s, speed-up {summary['speedup']:.0f}x  |  student params {summary['student_params']:,}"
    )
    if "student_over_fasttext" in summary:
        lines += ["", _fasttext_line(summary)]
    choices = summary.get("choices") or {}
    if findings := summary.get("findings"):
        lines += ["", "Findings (dev):", *(f"- {f}" for f in findings)]
    if choices:
        lines += ["", "What the defaults chose:", *(f"- {k}: {v}" for k, v in choices.items())]
    return "\n".join(lines)
