"""A synthetic corpus of any size: documents of Zipf-distributed words, written to Parquet in row groups.

Streams: memory stays flat whatever --docs is.

    python benchmarks/make_synthetic_corpus.py --docs 1000000 --out data/synthetic/corpus-1m.parquet
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def make_corpus(
    out: str | Path,
    docs: int,
    vocab: int = 200_000,
    zipf_a: float = 1.1,
    min_words: int = 5,
    max_words: int = 60,
    chunk: int = 100_000,
    seed: int = 0,
) -> Path:
    """Write `docs` documents with columns id and text; words are `w<rank>` with Zipf(a) ranks below `vocab`."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(vocab)], dtype=object)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for first in range(0, docs, chunk):
            n = min(chunk, docs - first)
            lengths = rng.integers(min_words, max_words + 1, size=n)
            ranks = rng.zipf(zipf_a, size=int(lengths.sum()))
            ranks = np.where(ranks > vocab, rng.integers(1, vocab + 1, size=ranks.size), ranks) - 1
            tokens = words[ranks]
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            texts = [" ".join(tokens[bounds[i] : bounds[i + 1]]) for i in range(n)]
            ids = [f"doc{first + i}" for i in range(n)]
            writer.write_table(pa.table({"id": ids, "text": texts}, schema=schema), row_group_size=chunk)
    tmp.replace(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", type=int, default=200_000, help="Distinct words.")
    p.add_argument("--zipf-a", type=float, default=1.1, help="Zipf exponent of word ranks.")
    p.add_argument("--min-words", type=int, default=5)
    p.add_argument("--max-words", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    path = make_corpus(a.out, a.docs, a.vocab, a.zipf_a, a.min_words, a.max_words, seed=a.seed)
    print(f"wrote {a.docs:,} documents to {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
