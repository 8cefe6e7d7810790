"""A corpus of sentences from a corpus of documents, and the advice to make one."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from sparse_distill.data import DataError
from sparse_distill.sentences import sentence_advice, split_sentences, write_sentence_corpus

REVIEW = (
    'I went in expecting little. The cast is "superb." Every scene works, and the score is lovely!<br /><br />'
    "Is it too long? Yes. But the last act, with its quiet and patient ending, earns every minute of it.\n"
    "Ten out of ten from me and my friends."
)


def test_documents_split_at_sentence_ends_and_paragraphs_within_the_word_bounds():
    assert split_sentences(REVIEW, min_words=3, max_words=12) == [
        "I went in expecting little.",
        'The cast is "superb."',
        "Every scene works, and the score is lovely!",
        "Is it too long?",
        "Ten out of ten from me and my friends.",
    ]  # "Yes." is under 3 words; the last act's sentence is over 12
    assert split_sentences("  no   end mark\tat all ") == ["no end mark at all"]  # one sentence, spaces collapsed


def test_a_sentence_corpus_keeps_document_ids_and_streams_every_file(tmp_path):
    pd.DataFrame({"doc": ["r1", "r2", "r3"], "text": [REVIEW, "Short. Far too short to keep.", REVIEW]}).to_parquet(
        tmp_path / "a.parquet"
    )
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "One more review here, and a good one."}) + "\n")
    out = tmp_path / "out" / "sentences.parquet"
    seen = []
    result = write_sentence_corpus(
        [str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl")],
        out,
        chunk_size=2,
        id_column=None,
        progress=lambda done, total: seen.append((done, total)),
    )
    table = pq.read_table(out).to_pydict()
    assert result == {"out": str(out), "documents": 4, "sentences": len(table["id"])}
    assert seen == [(2, 4), (3, 4), (4, 4)]  # a chunk at a time: a.parquet in two, then b.jsonl
    assert table["id"][:2] == ["a.parquet:0#0", "a.parquet:0#1"] and table["id"][-1] == "b.jsonl:0#0"
    assert "Far too short to keep." in table["text"] and "Short." not in table["text"]
    assert len(set(table["id"])) == len(table["id"])


def test_a_bad_row_names_its_file_and_row_and_leaves_no_output(tmp_path):
    pd.DataFrame({"text": [REVIEW, ""]}).to_parquet(tmp_path / "bad.parquet")
    out = tmp_path / "sentences.parquet"
    with pytest.raises(DataError, match=r"bad\.parquet: row 1"):
        write_sentence_corpus([str(tmp_path / "bad.parquet")], out)
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.parquet"]  # no partial file, no temporary left


def test_the_advice_comes_for_long_documents_and_a_task_of_sentences_only():
    phrases = ["a gorgeous , witty film", "dull", "not bad at all", "the plot goes nowhere fast"] * 10
    reviews = [" ".join(["word"] * 200)] * 10
    sentences = [" ".join(["word"] * 16)] * 10
    assert "split into sentences, they help" in sentence_advice(phrases, reviews)
    assert sentence_advice(phrases, sentences) is None  # a sentence corpus, 4 times the phrases' length at most
    assert sentence_advice(reviews, reviews) is None  # a task of reviews reads whole reviews


def test_the_sentences_command_writes_the_file(tmp_path, capsys):
    from flows.cli import main

    pd.DataFrame({"text": [REVIEW] * 3}).to_parquet(tmp_path / "reviews.parquet")
    out = tmp_path / "sentences.parquet"
    assert main(["sentences", "--corpus", str(tmp_path / "reviews.parquet"), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 3
    assert pq.read_table(out).num_rows == 3 * len(split_sentences(REVIEW))
