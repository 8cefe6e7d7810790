"""Loading splits: formats, label maps, and errors that name the file, the row and the column."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_distill.config import ConfigError, load_config
from sparse_distill.data import DataError, LabelMap, load_split
from sparse_distill.pipeline import load_task_data
from sparse_distill.preflight import check_pipeline_inputs


def test_label_map_round_trip_for_ints_and_strings(tmp_path):
    for values in (["pos", "neg", "pos"], [1, 0, 2, 1]):
        lm = LabelMap.from_values(values)
        lm.save(tmp_path / "lm.json")
        back = LabelMap.load(tmp_path / "lm.json")
        assert back == lm
        assert [back.decode(i) for i in back.encode(values)] == values


def test_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(4)))
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",1\nbye,0\n')
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    assert load_split(str(tmp_path / "a.jsonl")).labels == [0, 1, 0, 1]
    assert load_split(str(tmp_path / "a.csv")).texts == ["hello, world", "bye"]
    assert load_split(str(tmp_path / "a.txt"), label_column=None).texts == ["one", "two"]


def test_non_string_text_names_row(tmp_path):
    pq.write_table(pa.table({"text": [1, 2], "label": [0, 1]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: row 0, column 'text': text is int, not a string"):
        load_split(str(tmp_path / "t.parquet"))


def test_missing_column_names_file_and_column(tmp_path):
    pq.write_table(pa.table({"review": ["x y"], "label": [1]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: column 'text' not found"):
        load_split(str(tmp_path / "t.parquet"))


@pytest.mark.parametrize("bad,msg", [("", "text is empty"), (None, "text is missing"), ("   ", "text is empty")])
def test_bad_text_names_row(tmp_path, bad, msg):
    pq.write_table(pa.table({"text": ["fine", bad], "label": [0, 1]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=rf"t\.parquet: row 1, column 'text': {msg}"):
        load_split(str(tmp_path / "t.parquet"))


def test_unknown_dev_label_names_row(tmp_path):
    pq.write_table(pa.table({"text": ["a b", "c d"], "label": ["pos", "neg"]}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"text": ["a b", "e f"], "label": ["pos", "neutral"]}), tmp_path / "dev.parquet")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{data_dir: {tmp_path}, train: train.parquet, dev: dev.parquet}}\nteacher: {{model: x}}\n")
    with pytest.raises(DataError, match=r"dev\.parquet: row 1, column 'label': label 'neutral' never occurs"):
        load_task_data(load_config(cfg).data)


def test_a_row_limit_that_drops_labels_says_so(tmp_path):
    # Sorted by label, as IMDB's train file is: the first rows hold one label, or two of three.
    labels = ["neg"] * 3 + ["pos"] * 3 + ["mixed"] * 3
    pq.write_table(pa.table({"text": [f"t {i}" for i in range(9)], "label": labels}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": ["neg", "pos", "mixed"]}), tmp_path / "dev.parquet")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{data_dir: {tmp_path}, train: train.parquet, dev: dev.parquet}}\nteacher: {{model: x}}\n")
    config = load_config(cfg)
    hint = r"only the train file's first 3 rows are read, and a file sorted by label loses whole labels"
    first = lambda n: config.model_copy(update={"data": config.data.model_copy(update={"max_train_samples": n})})  # noqa: E731
    # The run's pre-flight checks meet the data before any stage does (the CLI's and the flow's first step).
    with pytest.raises(DataError, match=rf"data\.train: .*train\.parquet: .*fewer than 2 labels.*{hint}"):
        check_pipeline_inputs(first(3))
    with pytest.raises(DataError, match=r"data\.dev: .*dev\.parquet: row 2, column 'label': label 'mixed'.*first 6"):
        check_pipeline_inputs(first(6))
    assert load_task_data(config.data).label_map.num_classes == 3  # without the limit, every label is there


def test_config_unknown_keys_and_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {train: a, dev: b}\nteacher: {model: x, epochz: 3}\n")
    with pytest.raises(ConfigError, match="teacher.epochz"):
        load_config(cfg)
    cfg.write_text("data: {train: a, dev: b}\nteacher: {model: x}\n")
    c = load_config(cfg, ["teacher.epochs=3.5", "vocab.size=10", "student.pooling=max"])
    assert (c.teacher.epochs, c.vocab.size, c.student.pooling) == (3.5, 10, "max")
    with pytest.raises(ConfigError, match="student.pooling"):
        load_config(cfg, ["student.pooling=median"])
