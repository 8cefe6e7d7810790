"""Stage cache keys (`pipeline.stage_fingerprints`): a config change reaches its stage and the stages after it, and
nothing else; runtime settings and old runs' defaults stay out of the keys; input files are part of them. Also what a
run's summary says about its data (`lineage_datasets`, `run_choices`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_distill.pipeline import data_fingerprint, stage_fingerprints, student_key

STAGES = {"teacher", "label_train", "label_corpus", "vocab", "distill", "kdft", "scratch", "evaluate"}


def _with(cfg, section: str, **update):
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=update)})


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    """The stages of STAGES whose key changed (stages added later are checked by their own tests)."""
    assert set(before) == set(after) >= STAGES
    return {stage for stage in STAGES if before[stage] != after[stage]}


def test_keys_are_stable(tiny_config):
    fps = stage_fingerprints(tiny_config)
    assert fps == stage_fingerprints(tiny_config.model_copy(deep=True))
    assert set(fps) >= STAGES and len(set(fps.values())) == len(fps)  # no two stages share a key


def test_adding_the_layers_field_keeps_old_cache_keys(tiny_config):
    fps = stage_fingerprints(tiny_config)
    deeper = _with(tiny_config, "student", layers=2)
    assert "layers" not in student_key(tiny_config)
    changed = stage_fingerprints(deeper)
    assert changed["distill"] != fps["distill"] and changed["scratch"] != fps["scratch"]
    assert changed["teacher"] == fps["teacher"] and changed["vocab"] == fps["vocab"]


def test_a_config_change_recomputes_its_stage_and_its_dependants_only(tiny_config):
    fps = stage_fingerprints(tiny_config)
    # the README's example: a new fine-tuning lr reruns KD+FT and evaluation, not the teacher, labels, vocab or KD
    assert _changed(fps, stage_fingerprints(_with(tiny_config, "finetune", lr=1e-4))) == {"kdft", "evaluate"}
    assert _changed(fps, stage_fingerprints(_with(tiny_config, "vocab", size=400))) == {
        "vocab",
        "distill",
        "kdft",
        "scratch",
        "evaluate",
    }
    assert _changed(fps, stage_fingerprints(_with(tiny_config, "teacher", lr=1e-3))) == STAGES - {"vocab", "scratch"}
    assert _changed(fps, stage_fingerprints(_with(tiny_config, "scratch", lr=1e-4))) == {"scratch", "evaluate"}
    assert _changed(fps, stage_fingerprints(_with(tiny_config, "evaluate", speed_docs=128))) == {"evaluate"}


def test_a_row_limit_reaches_only_the_stages_that_read_its_data(tiny_config):
    fps = stage_fingerprints(tiny_config)
    assert tiny_config.data.corpus and tiny_config.data.max_corpus_samples is None
    # fewer corpus documents: the teacher and the train set's labels stay cached
    fewer_docs = stage_fingerprints(_with(tiny_config, "data", max_corpus_samples=10))
    assert _changed(fps, fewer_docs) == STAGES - {"teacher", "label_train"}
    # fewer train rows: everything moves, the corpus labels because their teacher does, not through the limit
    fewer_rows = _with(tiny_config, "data", max_train_samples=10)
    assert _changed(fps, stage_fingerprints(fewer_rows)) == STAGES
    assert data_fingerprint(fewer_rows.data, (), corpus=True) == data_fingerprint(tiny_config.data, (), corpus=True)


def test_the_gold_weight_counts_in_distillation_only(tiny_config):
    fps = stage_fingerprints(tiny_config)
    assert _changed(fps, stage_fingerprints(_with(tiny_config, "distill", gold_weight=0.2))) == {
        "distill",
        "kdft",
        "evaluate",
    }
    # the gold-label stages ignore the setting, so it stays out of their keys
    assert stage_fingerprints(_with(tiny_config, "scratch", gold_weight=0.2)) == fps
    assert stage_fingerprints(_with(tiny_config, "finetune", gold_weight=1.0)) == fps


def test_the_distillation_loss_counts_in_distillation_only_and_kl_keeps_old_keys(tiny_config):
    fps = stage_fingerprints(tiny_config)
    assert tiny_config.distill.loss == "logit_mse"
    assert _changed(fps, stage_fingerprints(_with(tiny_config, "distill", loss="kl"))) == {
        "distill",
        "kdft",
        "evaluate",
    }
    assert "loss" not in _with(tiny_config, "distill", loss="kl").distill.cache_dump()
    assert stage_fingerprints(_with(tiny_config, "scratch", loss="kl")) == fps
    assert stage_fingerprints(_with(tiny_config, "finetune", loss="kl")) == fps


def test_the_teachers_truncation_is_the_teachers_and_head_keeps_old_keys(tiny_config):
    fps = stage_fingerprints(tiny_config)
    assert tiny_config.teacher.truncation == "head_tail"
    head = _with(tiny_config, "teacher", truncation="head")
    assert _changed(fps, stage_fingerprints(head)) == STAGES - {"vocab", "scratch"}
    assert "truncation" not in head.teacher.cache_dump() and "truncation" in tiny_config.teacher.cache_dump()


def test_how_the_work_is_spread_stays_out_of_the_keys(tiny_config):
    fps = stage_fingerprints(tiny_config)
    spread = _with(tiny_config, "label", runner="process", workers=4, retries=5)
    spread = _with(spread, "vocab", runner="dask", workers=2, shard_size=7, partitions=3, memory_mb=64)
    assert stage_fingerprints(spread) == fps
    # ... but what the labels are does count
    assert _changed(fps, stage_fingerprints(_with(tiny_config, "label", shard_size=64))) >= {"label_corpus", "distill"}


def test_changing_an_input_file_changes_the_stages_that_read_it_and_copying_it_does_not(tiny_config, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_config.data.data_dir, data)
    cfg = _with(tiny_config, "data", data_dir=str(data))
    fps = stage_fingerprints(cfg)
    # The same bytes elsewhere, or touched: every stage is still fresh (a re-synced data set keeps its teacher).
    assert fps == stage_fingerprints(tiny_config)
    corpus = data / tiny_config.data.corpus[0]
    st = corpus.stat()
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert stage_fingerprints(cfg) == fps
    # One corpus text changed: the corpus feeds the corpus labels and the vocabulary, then everything trained on them.
    table = pq.read_table(corpus).to_pydict()
    table["text"][0] += " again"
    pq.write_table(pa.table(table), corpus)
    assert _changed(fps, stage_fingerprints(cfg)) == STAGES - {"teacher", "label_train"}


def test_lineage_datasets_describe_the_data_without_loading_the_corpus(tiny_config, tmp_path):
    from sparse_distill.pipeline import lineage_datasets

    records = {r.context: r for r in lineage_datasets(tiny_config, tmp_path / "lineage")}
    assert set(records) == {"train", "dev", "test", "corpus"}
    assert (records["train"].rows, records["dev"].rows, records["corpus"].rows) == (300, 80, 400)
    assert records["train"].name == "train.parquet" and records["train"].source.endswith("train.parquet")
    assert len(records["train"].digest) == 16 and records["train"].digest != records["dev"].digest
    manifest = json.loads(Path(records["corpus"].source).read_text())
    assert manifest["rows"] == 400 and manifest["files"][0]["path"].endswith("corpus.parquet")


def test_the_summary_names_the_corpus_and_advises_one_where_there_is_none(tiny_config, tmp_path, caplog):
    from sparse_distill.pipeline import run_choices
    from sparse_distill.preflight import check_pipeline_inputs
    from sparse_distill.run_store import stage_dir, write_result

    run_dir = tmp_path / "run"
    assert "corpus" not in run_choices(tiny_config, run_dir)  # listed but not labelled yet: nothing to say
    write_result(stage_dir(run_dir, "label_corpus"), "label_corpus", "fp", {"rows": 400, "shards": 1})
    assert run_choices(tiny_config, run_dir)["corpus"].startswith("400 unlabelled texts labelled by the teacher")
    no_corpus = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(update={"corpus": []})})
    advice = run_choices(no_corpus, run_dir)["corpus"]
    assert advice.startswith("none (data.corpus empty)") and "unlabelled texts of the task's domain" in advice
    # Documents far longer than the task's texts, with the split turned off: advice to split them into sentences
    # (the same advice warns at pre-flight). With the default, the run splits them and nothing warns.
    import pandas as pd

    long_docs = tmp_path / "long.parquet"
    d, review = tiny_config.data, " ".join(["a good film"] * 40)
    pd.DataFrame({d.id_column: list("abcde"), d.text_column: [review] * 5}).to_parquet(long_docs)
    documents = tiny_config.model_copy(
        update={"data": tiny_config.data.model_copy(update={"corpus": [str(long_docs)], "corpus_split": "none"})}
    )
    line = run_choices(documents, run_dir)["corpus"]
    assert line.startswith("400 unlabelled texts") and "median of 120 words" in line
    assert line.endswith("split into sentences, they help (SST-2 with 5,000 train phrases: KD 0.761 on 50k whole IMDB "
                         "reviews, 0.820 on 200k of their sentences) (data.corpus_split is 'none')")  # fmt: skip
    auto = documents.model_copy(update={"data": documents.data.model_copy(update={"corpus_split": "auto"})})
    with caplog.at_level("WARNING", logger="sparse_distill.preflight"):
        check_pipeline_inputs(documents)
        check_pipeline_inputs(auto)
        check_pipeline_inputs(tiny_config)  # the tiny corpus is of texts like the train set's: no warning
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].endswith("set data.corpus_split to 'auto' (the default) to split them")
    assert "median of 120 words" in warnings[0]


def _document_corpus(tiny_config, path: Path, reviews_per_document: int = 10):
    """The tiny corpus's reviews joined into documents (sentences ending in '.'), listed as the config's corpus."""
    import pandas as pd

    reviews = pd.read_parquet(Path(tiny_config.data.data_dir) / "corpus.parquet")["text"].tolist()
    documents = [
        ". ".join(reviews[i : i + reviews_per_document]) + "." for i in range(0, len(reviews), reviews_per_document)
    ]
    pd.DataFrame({"id": [f"doc{i}" for i in range(len(documents))], "text": documents}).to_parquet(path)
    data = tiny_config.data.model_copy(update={"corpus": [str(path)]})
    return tiny_config.model_copy(update={"data": data}), reviews


def test_a_corpus_of_documents_is_split_into_sentences_for_a_task_of_short_texts(tiny_config, tmp_path):
    from sparse_distill.pipeline import (
        corpus_split_fingerprint,
        run_corpus_sentences,
        split_config,
        stage_fingerprints,
        with_corpus_split,
    )
    from sparse_distill.run_store import stage_dir, write_result

    documents, reviews = _document_corpus(tiny_config, tmp_path / "docs.parquet")
    record = run_corpus_sentences(documents, tmp_path / "split")
    assert record["split"] and record["documents"] == 40 and record["sentences"] == len(reviews) == 400
    assert "auto: median" in record["reason"] and "split into 400 sentences" in record["reason"]
    table = pq.read_table(record["corpus"][0]).to_pydict()  # the config's own column names: read like the documents
    assert table["text"][:2] == [f"{r}." for r in reviews[:2]] and table["id"][:2] == ["doc0#0", "doc0#1"]
    after = with_corpus_split(documents, record)
    assert after.data.corpus == record["corpus"] and after.data.corpus_split == "none"
    assert stage_fingerprints(after)["label_corpus"] != stage_fingerprints(documents)["label_corpus"]

    # The tiny corpus is of texts like the train set's: kept whole under "auto", split when asked.
    whole = run_corpus_sentences(tiny_config, tmp_path / "whole")
    assert not whole["split"] and with_corpus_split(tiny_config, whole) is tiny_config
    forced = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(update={"corpus_split": "sentences"})})
    assert run_corpus_sentences(forced, tmp_path / "forced")["split"]

    # The stage's key: none without a corpus or with the split off; max_corpus_samples (applied after) not in it.
    off = documents.model_copy(update={"data": documents.data.model_copy(update={"corpus_split": "none"})})
    assert corpus_split_fingerprint(off) is None
    capped = documents.model_copy(update={"data": documents.data.model_copy(update={"max_corpus_samples": 5})})
    assert corpus_split_fingerprint(capped) == corpus_split_fingerprint(documents)
    assert corpus_split_fingerprint(forced) != corpus_split_fingerprint(tiny_config)

    # A run directory's config: the split corpus once the stage is recorded fresh for this config, not before.
    run_dir = tmp_path / "run"
    assert split_config(documents, run_dir) is documents
    folder = stage_dir(run_dir, "sentences")
    write_result(folder, "sentences", corpus_split_fingerprint(documents), {**record, "out_dir": str(folder)})
    assert split_config(documents, run_dir).data.corpus == record["corpus"]
    assert split_config(forced, run_dir) is forced  # recorded for another config


def _without_dev(config):
    return config.model_copy(update={"data": config.data.model_copy(update={"dev": None})})


def test_without_a_dev_split_the_run_holds_one_out_of_train_per_label(tiny_config, tmp_path):
    from sparse_distill.data import DataError, load_split
    from sparse_distill.pipeline import (
        dev_holdout_fingerprint,
        load_task_data,
        run_choices,
        run_dev_holdout,
        split_config,
        stage_fingerprints,
        with_dev_holdout,
    )
    from sparse_distill.run_store import stage_dir, write_result

    config = _without_dev(tiny_config)
    with pytest.raises(DataError, match="data.dev"):
        load_task_data(config.data)  # a raw config without dev: only a run's holdout stage makes one
    record = run_dev_holdout(config, tmp_path / "holdout")
    train, dev = (load_split(record[s], "text", "label", "id") for s in ("train", "dev"))
    original = load_split(str(Path(tiny_config.data.data_dir) / "train.parquet"), "text", "label", "id")
    # A tenth of each label's rows held out, none lost, none in both; every column kept (the ids are the file's own).
    assert (record["train_rows"], record["dev_rows"]) == (len(train), len(dev)) == (270, 30)
    assert sorted(train.ids + dev.ids) == sorted(original.ids) and not set(train.ids) & set(dev.ids)
    for label in set(original.labels):
        assert dev.labels.count(label) == round(0.1 * original.labels.count(label))
    assert "30 of 300 train rows held out as dev" in record["reason"]
    # The same rows on every run; the config the stages run with reads the two files, and loads.
    assert run_dev_holdout(config, tmp_path / "again")["dev_rows"] == 30
    assert load_split(str(tmp_path / "again" / "dev.parquet"), "text", "label", "id").ids == dev.ids
    after = with_dev_holdout(config, record)
    assert (after.data.train, after.data.dev) == (record["train"], record["dev"])
    assert len(load_task_data(after.data).dev.texts) == 30

    # The stage's key: none where dev is given; the row limit and the share move it.
    assert dev_holdout_fingerprint(tiny_config) is None
    limited = config.model_copy(update={"data": config.data.model_copy(update={"max_train_samples": 100})})
    other = config.model_copy(update={"data": config.data.model_copy(update={"dev_holdout": 0.2})})
    assert len({dev_holdout_fingerprint(c) for c in (config, limited, other)}) == 3
    assert run_dev_holdout(limited, tmp_path / "limited")["train_rows"] + 10 == 100
    # A run directory's config: the held-out files once the stage is recorded fresh for this config, not before.
    run_dir = tmp_path / "run"
    assert split_config(config, run_dir) is config
    folder = stage_dir(run_dir, "holdout")
    write_result(folder, "holdout", dev_holdout_fingerprint(config), {**record, "out_dir": str(folder)})
    assert split_config(config, run_dir).data.dev == record["dev"]
    assert split_config(other, run_dir) is other
    # The summary says what was held out, for the run that used it.
    assert run_choices(split_config(config, run_dir), run_dir)["dev"] == record["reason"]
    assert "dev" not in run_choices(tiny_config, run_dir)
    assert stage_fingerprints(split_config(config, run_dir))["teacher"] != stage_fingerprints(tiny_config)["teacher"]


def test_holdout_rows_keep_a_train_row_of_every_label_and_stay_under_the_cap():
    from sparse_distill.pipeline import holdout_rows

    labels = ["a"] * 50 + ["b"] * 3 + ["c"]
    rows = holdout_rows(labels, 0.4)
    assert [labels[i] for i in rows].count("a") == 20 and [labels[i] for i in rows].count("b") == 1
    assert "c" not in [labels[i] for i in rows]  # a label with one row keeps it for training
    assert holdout_rows(labels, 0.4) == rows and holdout_rows(labels, 0.4, seed=1) != rows
    assert len(holdout_rows(["x", "y"] * 10_000, 0.3, max_rows=500)) == 500
    assert len(holdout_rows([str(i % 7) for i in range(70_000)], 0.1, max_rows=4995)) == 4995  # 7 x 713.6 -> 4,998


def test_max_length_auto_is_chosen_from_the_texts_and_keys_the_teacher_like_the_number_it_chose(tiny_config, tmp_path):
    from sparse_distill.pipeline import run_teacher_length, teacher_length_fingerprint, with_teacher_length

    assert teacher_length_fingerprint(tiny_config) is None  # a number: no such stage
    auto = tiny_config.model_copy(update={"teacher": tiny_config.teacher.model_copy(update={"max_length": "auto"})})
    fp = teacher_length_fingerprint(auto)
    assert fp is not None
    capped = auto.model_copy(update={"teacher": auto.teacher.model_copy(update={"max_length_cap": 128})})
    assert teacher_length_fingerprint(capped) != fp

    record = run_teacher_length(auto)
    # The tiny reviews are 5-15 words: one step of 32 tokens covers them.
    assert record["max_length"] == 32 and "90% of the train texts within" in record["reason"]
    chosen = with_teacher_length(auto, record)
    assert chosen.teacher.max_length == 32
    # The teacher's key is the one an explicit 32 gives: runs made before "auto" keep their teacher; the cap that
    # chose the number is not in it.
    assert stage_fingerprints(chosen) == stage_fingerprints(tiny_config)
    assert stage_fingerprints(with_teacher_length(capped, record)) == stage_fingerprints(tiny_config)


def test_max_length_auto_reads_the_row_limited_train_split_and_names_a_bad_file(tiny_config, tmp_path):
    from sparse_distill.data import DataError
    from sparse_distill.pipeline import run_teacher_length

    # 20 short reviews first, then 200 documents of 300 words.
    texts = ["a great film", "dull"] * 10 + [" ".join(["the plot was dull and the actors were weak"] * 30)] * 200
    pq.write_table(pa.table({"text": texts, "label": ["pos", "neg"] * 110}), tmp_path / "train.parquet")
    data = tiny_config.data.model_copy(update={"data_dir": str(tmp_path), "train": "train.parquet", "dev": None})
    teacher = tiny_config.teacher.model_copy(update={"max_length": "auto"})
    cfg = tiny_config.model_copy(update={"data": data, "teacher": teacher})
    # No more than the model reads: the tiny teacher has 64 positions (its tokenizer sets no limit), under the cap.
    record = run_teacher_length(cfg)
    assert record["max_length"] == 64 and "of the train texts within more than 64" in record["reason"]
    assert "dev" not in record["reason"]
    assert "the model's limit 64, under teacher.max_length_cap 256" in record["reason"]
    capped = cfg.model_copy(update={"teacher": teacher.model_copy(update={"max_length_cap": 48})})
    assert run_teacher_length(capped)["max_length"] == 48  # the cap itself, not a multiple of 32
    limited = cfg.model_copy(update={"data": data.model_copy(update={"max_train_samples": 20})})
    assert run_teacher_length(limited)["max_length"] == 32

    (tmp_path / "bad.parquet").write_text("not parquet")
    bad = cfg.model_copy(update={"data": data.model_copy(update={"train": "bad.parquet"})})
    with pytest.raises(DataError, match="bad.parquet"):
        run_teacher_length(bad)
