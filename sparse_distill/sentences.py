"""A corpus of sentences from a corpus of documents, for tasks whose texts are sentences.

The teacher labels each corpus document as a whole (cut at its label length) while the vocabulary counts every
n-gram of it, so long documents give the student n-grams with a label that is not theirs. On SST-2 with 5,000 train
phrases, IMDB's 50k unlabelled reviews as the corpus left KD at 0.761 on test, below no corpus at all (0.778); the
530k sentences of the same reviews gave 0.821 (README, "Quality against fastText").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from statistics import median

import pyarrow as pa
import pyarrow.parquet as pq

from sparse_distill.corpus import read_rows
from sparse_distill.data import atomic_path, expand_paths
from sparse_distill.shard_plan import CorpusSource, plan_shards

logger = logging.getLogger(__name__)

# A sentence ends at . ! or ? (with closing quotes or brackets) before white space; HTML line breaks and newlines
# (IMDB writes `<br /><br />` between paragraphs) end one too.
_BREAKS = re.compile(r"<br\s*/?>|\n+", re.IGNORECASE)
_ENDS = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")
_WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    """Words: runs of word characters (one-letter words count too, unlike the vocabulary's tokens)."""
    return len(_WORD.findall(text))


def split_sentences(text: str, min_words: int = 5, max_words: int = 40) -> list[str]:
    """The sentences of one document with `min_words` to `max_words` words, white space collapsed."""
    out = []
    for paragraph in _BREAKS.split(text):
        for piece in _ENDS.split(paragraph):
            sentence = " ".join(piece.split())
            if min_words <= count_words(sentence) <= max_words:
                out.append(sentence)
    return out


def median_words(texts: list[str]) -> float:
    """The median number of words of `texts` (0 for none)."""
    return float(median(count_words(t) for t in texts)) if texts else 0.0


def write_sentence_corpus(
    inputs: list[str],
    out: str | Path,
    text_column: str = "text",
    id_column: str | None = None,
    min_words: int = 5,
    max_words: int = 40,
    chunk_size: int = 10_000,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int | str]:
    """Split every document of the corpus files `inputs` (globs allowed) into sentences and write them to one Parquet
    file `out` under the input's column names (`id_column`, else `id`: `<document id>#<k>`; `text_column`: the
    sentence), so that a config reads the sentences as it read the documents. Streamed a chunk of documents at a time
    and renamed into place when complete. Returns the counts; `progress(documents_done, documents_total)` after each
    chunk."""
    plan = plan_shards([CorpusSource(p, text_column, id_column) for p in expand_paths(inputs)], chunk_size)
    documents = sentences = 0
    id_name = id_column or "id"
    schema = pa.schema([(id_name, pa.string()), (text_column, pa.string())])
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for shard in plan.shards:
            src = plan.sources[shard.source]
            texts, ids = read_rows(
                src.path, shard.start, shard.stop, src.text_column, src.id_column, shard.offset, src.id_prefix
            )
            rows: dict[str, list[str]] = {id_name: [], text_column: []}
            for doc_id, text in zip(ids, texts, strict=True):
                for k, sentence in enumerate(split_sentences(text, min_words, max_words)):
                    rows[id_name].append(f"{doc_id}#{k}")
                    rows[text_column].append(sentence)
            writer.write_table(pa.table(rows, schema=schema))
            documents += len(texts)
            sentences += len(rows[id_name])
            if progress:
                progress(documents, plan.total_rows)
            logger.info("sentences: %d documents of %d split, %d sentences", documents, plan.total_rows, sentences)
    return {"out": str(out), "documents": documents, "sentences": sentences}


def far_longer(task_median: float, corpus_median: float) -> bool:
    """Corpus documents far longer than the task's texts: a median over 4 times theirs and over 60 words."""
    return corpus_median > max(4 * task_median, 60)


def sentence_advice(task_texts: list[str], corpus_texts: list[str]) -> str | None:
    """Advice to split the corpus into sentences when its documents are far longer than the task's texts (the
    median over 4 times the task's and over 60 words), else None."""
    task, corpus = median_words(task_texts), median_words(corpus_texts)
    if not far_longer(task, corpus):
        return None
    return (
        f"data.corpus's documents have a median of {corpus:.0f} words against {task:.0f} for the train texts: the "
        "teacher would label each document as one text, which teaches the student little about texts like the task's; "
        "split into sentences, they help (SST-2 with 5,000 train phrases: KD 0.761 on 50k whole IMDB reviews, 0.820 on "
        "200k of their sentences)"
    )
