"""Make an in-domain sentence corpus for SST-2 from IMDB's unlabelled reviews.

SST-2 ships no unlabelled corpus; IMDB's 50k unlabelled reviews are the same domain (movie reviews). They are split
into sentences and tokenised the way SST-2 is (lowercased, punctuation split off), keeping sentences of 5-40 tokens.

    python benchmarks/make_sentence_corpus.py ../shared/data/imdb/unsup.parquet data/sst2-corpus/imdb_sentences.parquet
"""

from __future__ import annotations

import argparse
import random
import re

import pyarrow as pa

from sparse_distill.data import atomic_write_parquet, load_split


def sentences(text: str) -> list[str]:
    """SST-style sentences of one review: split at . ! ?, lowercased, punctuation as separate tokens."""
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text.replace("<br />", " ")):
        words = re.findall(r"\w+|[^\w\s]", s.lower())
        if 5 <= len(words) <= 40:
            out.append(" ".join(words))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reviews", help="Parquet file with a text column (e.g. IMDB unsup.parquet).")
    parser.add_argument("out", help="Output Parquet file (column text).")
    parser.add_argument("--max-sentences", type=int, default=80_000, help="Stop after this many sentences.")
    parser.add_argument("--seed", type=int, default=0, help="Review shuffling seed.")
    args = parser.parse_args()
    texts = load_split(args.reviews, label_column=None).texts
    random.Random(args.seed).shuffle(texts)
    out: list[str] = []
    for t in texts:
        out.extend(sentences(t))
        if len(out) >= args.max_sentences:
            break
    atomic_write_parquet(pa.table({"text": out[: args.max_sentences]}), args.out)
    print(f"wrote {min(len(out), args.max_sentences)} sentences to {args.out}")


if __name__ == "__main__":
    main()
