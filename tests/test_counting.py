"""Corpus-scale counting: equal to CountVectorizer (ties included), exact under spills and multi-pass sums,
resumable per shard, and bad input fails only its shard with a message naming file and row."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.feature_extraction.text import CountVectorizer

from sparse_distill.config import VocabJob
from sparse_distill.counting import (
    SPILLS,
    CountingFailed,
    count_shard,
    partition_of,
    reduce_partition,
    run_count_job,
)
from sparse_distill.shard_plan import CorpusSource, ShardSpec
from sparse_distill.vocab import TOKEN_PATTERN, NgramVocab, Subwords, count_ngrams, cut_count, select_top


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = np.array(
        "the a film was great awful boring moving plot actors story dull superb and but Ünïcode x_y".split()
    )
    return [
        " ".join(rng.choice(words, size=int(rng.integers(1, 25)))) + rng.choice(["", "!", " ok."]) for _ in range(n)
    ]


def _write(tmp_path: Path, docs: list[str]) -> list[str]:
    """Half the documents as Parquet, half as plain text: both formats in one job."""
    half = len(docs) // 2
    pq.write_table(pa.table({"text": docs[:half]}), tmp_path / "a.parquet", row_group_size=97)
    (tmp_path / "b.txt").write_text("".join(d + "\n" for d in docs[half:]))
    return [str(tmp_path / "a.parquet"), str(tmp_path / "b.txt")]


def _job(inputs: list[str], out: Path, keep_spills: bool = False, **vocab) -> VocabJob:
    settings = {"size": 100, "ngram_max": 3, "shard_size": 130, "partitions": 5, **vocab}
    return VocabJob(inputs=inputs, out=str(out), keep_spills=keep_spills, vocab=settings)


def _vocab(out: Path) -> tuple[list[str], list[int]]:
    t = pq.read_table(Path(out) / "vocab.parquet")
    return t.column("ngram").to_pylist(), t.column("count").to_pylist()


@pytest.mark.parametrize("size", [1, 37, 100, 250, 10_000])
def test_equals_countvectorizer_including_ties(tmp_path, size):
    docs = _docs(600)
    inputs = _write(tmp_path, docs)
    reference = count_ngrams(docs, 3)
    sk = run_count_job(_job(inputs, tmp_path / "sk", size=size, tie_rule="sklearn"))
    cv = CountVectorizer(token_pattern=TOKEN_PATTERN, ngram_range=(1, 3), max_features=size).fit(docs)
    assert sk["distinct_ngrams"] == len(reference)
    assert set(_vocab(tmp_path / "sk")[0]) == set(cv.vocabulary_)
    # The default rule: count descending, ties in code-point order, the same as the in-memory reference.
    run_count_job(_job(inputs, tmp_path / "alpha", size=size))
    ngrams, counts = _vocab(tmp_path / "alpha")
    assert list(zip(ngrams, counts, strict=True)) == select_top(reference, size)
    # Both rules keep everything above the cut and as many tied n-grams.
    assert len(ngrams) == len(cv.vocabulary_)
    cut = min(counts)
    assert {g for g, c in zip(ngrams, counts, strict=True) if c > cut} == {
        g for g in cv.vocabulary_ if reference[g] > cut
    }


def test_ties_at_the_cut_are_resolved_across_partitions(tmp_path):
    # Every bigram here appears exactly once: the cut falls inside one big tie spread over all partitions.
    docs = [f"w{i:03d} v{i:03d}" for i in range(300)]
    inputs = _write(tmp_path, docs)
    run_count_job(_job(inputs, tmp_path / "out", size=650, ngram_max=2, partitions=7))
    ngrams, counts = _vocab(tmp_path / "out")
    assert list(zip(ngrams, counts, strict=True)) == select_top(count_ngrams(docs, 2), 650)
    assert counts == [1] * 650


def test_min_count_and_cut_count():
    assert cut_count({5: 2, 3: 4, 1: 10}, 4, 1) == (3, 2, 2)
    assert cut_count({5: 2, 3: 4, 1: 10}, 100, 2) == (2, 6, 0)  # fewer eligible than |V|: all kept


def test_min_count_drops_rare_ngrams(tmp_path):
    docs = _docs(300, seed=1)
    inputs = _write(tmp_path, docs)
    run_count_job(_job(inputs, tmp_path / "out", size=10_000, min_count=4))
    ngrams, counts = _vocab(tmp_path / "out")
    assert list(zip(ngrams, counts, strict=True)) == select_top(count_ngrams(docs, 3), 10_000, min_count=4)
    assert min(counts) >= 4


def test_spills_and_multi_pass_sums_stay_exact(tmp_path):
    # A budget of 1 MB forces a spill per chunk (the same n-gram spilled many times) and sums in several passes.
    docs = _docs(2000, seed=2)
    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
    src = CorpusSource(str(tmp_path / "c.parquet"))
    out = tmp_path / "out"
    rec = count_shard(src, ShardSpec(0, 0, 0, len(docs)), out, ngram_max=3, partitions=3, memory_mb=1)
    parts = [rg[0] for rg in rec.row_groups]
    assert len(parts) > 3 and rec.distinct > len(count_ngrams(docs, 3))  # spilled more than once
    total: Counter[str] = Counter()
    for p in range(3):
        pieces = [[0, rg, rows, nbytes] for part, rg, rows, nbytes in rec.row_groups if part == p]
        # Pretend each row group is 3 MB so that the sum needs several passes at 1 MB.
        pieces = [[s, rg, rows, 3 * 2**20] for s, rg, rows, _ in pieces]
        prec = reduce_partition(out, p, pieces, 3, memory_mb=1, inputs="x")
        assert prec.passes > 1
        table = pq.read_table(out / "counts" / prec.name)
        names = table.column("ngram").to_pylist()
        assert len(names) == len(set(names)) == prec.rows
        assert (partition_of(table.column("ngram"), 3) == p).all()
        total.update(dict(zip(names, table.column("count").to_pylist(), strict=True)))
        assert sum(n for _, n in prec.histogram) == prec.rows
    assert total == count_ngrams(docs, 3)


def test_resume_counts_only_missing_shards_then_reselects_without_counting(tmp_path):
    docs = _docs(700, seed=3)
    inputs = _write(tmp_path, docs)
    out = tmp_path / "out"
    first = run_count_job(_job(inputs, out, keep_spills=True))
    spills = sorted((out / SPILLS).glob("*.parquet"))
    assert len(spills) == 6
    before = {p.name: p.stat().st_mtime_ns for p in spills}
    # A crash: one shard's files gone, another's spill cut short, a stray temporary file.
    (out / SPILLS / "00002.json").unlink()
    (out / SPILLS / "00002.parquet").unlink()
    data = (out / SPILLS / "00004.parquet").read_bytes()
    (out / SPILLS / "00004.parquet").write_bytes(data[: len(data) // 2])
    (out / SPILLS / ".00001.parquet.x.tmp").write_bytes(b"junk")
    again = run_count_job(_job(inputs, out, keep_spills=True))
    after = {p.name: p.stat().st_mtime_ns for p in sorted((out / SPILLS).glob("*.parquet"))}
    assert {n for n in before if before[n] != after[n]} == {"00002.parquet", "00004.parquet"}
    assert not list((out / SPILLS).glob(".*.tmp"))
    assert again == first
    # Spills removed once summed; a new size or min-count only selects again from the summed partitions.
    run_count_job(_job(inputs, out))
    assert not list((out / SPILLS).glob("*.parquet"))
    bigger = run_count_job(_job(inputs, out, size=500, min_count=2))
    assert not list((out / SPILLS).glob("*.parquet"))
    assert _vocab(out) == tuple(map(list, zip(*select_top(count_ngrams(docs, 3), 500, min_count=2), strict=True)))
    assert bigger["docs"] == 700


def test_bad_row_fails_its_shard_names_file_and_row_and_resumes_after_the_fix(tmp_path):
    docs = _docs(400, seed=4)
    path = tmp_path / "c.txt"
    lines = [*docs]
    lines[250] = "   "  # a blank document
    path.write_text("".join(d + "\n" for d in lines))
    job = _job([str(path)], tmp_path / "out", keep_spills=True, shard_size=100)
    with pytest.raises(CountingFailed, match=r"c\.txt: row 250.*text is empty") as err:
        run_count_job(job)
    assert "00002.parquet" in str(err.value) and "rows 200-300" in str(err.value)
    records = {p.name: json.loads(p.read_text())["status"] for p in (tmp_path / "out" / SPILLS).glob("*.json")}
    assert records == {"00000.json": "done", "00001.json": "done", "00002.json": "failed", "00003.json": "done"}
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / SPILLS).glob("*.parquet")}
    lines[250] = "fixed review"
    path.write_text("".join(d + "\n" for d in lines))
    run_count_job(job)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / SPILLS).glob("*.parquet")}
    assert {n for n in mtimes if after[n] != mtimes[n]} == set()
    assert set(after) - set(mtimes) == {"00002.parquet"}
    assert _vocab(tmp_path / "out") == tuple(map(list, zip(*select_top(count_ngrams(lines, 3), 100), strict=True)))


def test_other_inputs_or_settings_need_replan(tmp_path):
    docs = _docs(200, seed=5)
    inputs = _write(tmp_path, docs)
    run_count_job(_job(inputs, tmp_path / "out"))
    with pytest.raises(Exception, match="--replan"):
        run_count_job(_job(inputs[:1], tmp_path / "out"))
    with pytest.raises(Exception, match="--replan"):
        run_count_job(_job(inputs, tmp_path / "out", ngram_max=2))
    job = _job(inputs, tmp_path / "out", ngram_max=2).model_copy(update={"replan": True})
    run_count_job(job)
    assert _vocab(tmp_path / "out") == tuple(map(list, zip(*select_top(count_ngrams(docs, 2), 100), strict=True)))


def test_output_loads_as_the_students_vocabulary(tmp_path):
    docs = _docs(300, seed=6)
    inputs = _write(tmp_path, docs)
    run_count_job(_job(inputs, tmp_path / "out", size=80))
    vocab = NgramVocab.load(tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "vocab.json").read_text())
    assert len(vocab.ngrams) == meta["size"] == 80 and meta["docs"] == 300 and vocab.ngram_max == 3
    ids, offsets = vocab.featurize(docs[:5])
    assert len(offsets) == 5 and ids.max() < len(vocab)
    assert os.path.exists(tmp_path / "out" / "counts" / "_SUCCESS.json")
    # The subwords come from the config (on by default), also when only the selection runs again.
    assert vocab.subwords == Subwords(4, 4, 200_000) and len(vocab) == 80 + 200_000
    run_count_job(_job(inputs, tmp_path / "out", size=80, subword_buckets=0))
    assert NgramVocab.load(tmp_path / "out").subwords is None
    run_count_job(_job(inputs, tmp_path / "out", size=80, subword_buckets=10, subword_min=3, subword_max=5))
    assert NgramVocab.load(tmp_path / "out").subwords == Subwords(3, 5, 10)
