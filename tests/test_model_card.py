"""The model card: every section rendered, the fastText row read from the run directory when a benchmark put one
there, the folder's size without the card itself."""

from __future__ import annotations

import json
from dataclasses import replace

from sparse_distill.model_card import ModelCard, ModelRow, folder_bytes, read_fasttext_row, write_model_card


def _card(model_dir, rows) -> ModelCard:
    return ModelCard(
        title="demo: DAN (KD+FT)",
        task="demo",
        labels=["fresh", "rotten"],
        model_dir=str(model_dir),
        teacher="all-MiniLM-L6-v2",
        teacher_fingerprint="abc123",
        datasets=[
            ("train", "train.parquet", "/d/train.parquet", "0123456789abcdef", 1000),
            ("corpus", "c", "/m", "f", None),
        ],
        rows=rows,
        params={"total": 110, "sparse": 100, "dense": 10},
        config_yaml="name: demo\nstudent:\n  dim: 100\n",
        pooling="mean",
        table_dtype="float32",
        mlflow_uris=["runs:/r1/student"],
    )


def test_card_sections_and_fasttext_row(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "student.safetensors").write_bytes(b"x" * 2048)
    assert read_fasttext_row(tmp_path) is None
    (tmp_path / "fasttext.json").write_text(json.dumps({"accuracy": 0.83, "docs_per_s_one_core": 51378.4}))
    fasttext = read_fasttext_row(tmp_path)
    assert fasttext == ModelRow("fastText", None, 0.83, 51378.4)
    rows = [ModelRow("Teacher", 0.9, 0.88, 120.0), ModelRow("DAN (KD+FT)", 0.87, None, 9000.0, True), fasttext]
    path = write_model_card(_card(model_dir, rows))
    text = path.read_text()
    assert path == model_dir / "README.md" and text.startswith("# demo: DAN (KD+FT)")
    assert "`fresh`, `rotten`" in text and "fingerprint `abc123`" in text
    assert "| **DAN (KD+FT)** (this model) | 0.8700 | - | 9,000 |" in text
    assert "| fastText | - | 0.8300 | 51,378 |" in text
    assert "| train | train.parquet | 1,000 | `0123456789abcdef` | `/d/train.parquet` |" in text
    assert "| corpus | c | - | `f` | `/m` |" in text
    assert "110 parameters (100 in the n-gram table, 10 dense)" in text
    assert "# or: load_student('runs:/r1/student')" in text and "dim: 100" in text
    assert folder_bytes(model_dir) == 2048  # the card itself does not count
    assert "members" not in text
    three = write_model_card(replace(_card(model_dir, rows), members=3)).read_text()
    assert "table stored as float32; 3 members (DANs on their own share of the table's columns" in three


def test_fasttext_result_on_dev_and_unreadable(tmp_path):
    (tmp_path / "fasttext.json").write_text(json.dumps({"accuracy": 0.8, "test_split": "dev", "docs_per_s": 10}))
    assert read_fasttext_row(tmp_path) == ModelRow("fastText", 0.8, None, 10)
    (tmp_path / "fasttext.json").write_text("not json")
    assert read_fasttext_row(tmp_path) is None
