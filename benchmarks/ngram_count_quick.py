"""Quick check: vectorised n-gram counting vs the Python Counter vs CountVectorizer.fit, first 5,000 IMDB train reviews.

python benchmarks/ngram_count_quick.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from sklearn.feature_extraction.text import CountVectorizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_distill.vocab import _non_word_pattern, count_ngram_table, count_ngrams  # noqa: E402


def main() -> None:
    _non_word_pattern()  # built once per process; not part of the timing
    train = ROOT.parent / "shared/data/imdb/train.parquet"
    texts = pq.read_table(train, columns=["text"]).column("text").to_pylist()[:5000]
    start = time.perf_counter()
    table = count_ngram_table(texts, 4)
    t_arrow = time.perf_counter() - start
    start = time.perf_counter()
    count_ngrams(texts, 4)
    t_counter = time.perf_counter() - start
    start = time.perf_counter()
    CountVectorizer(ngram_range=(1, 4)).fit(texts)
    t_sklearn = time.perf_counter() - start
    print(
        f"{len(texts)} IMDB train reviews, n=1..4, {table.num_rows} distinct: count_ngram_table {t_arrow:.2f}s, "
        f"Counter {t_counter:.2f}s, CountVectorizer.fit {t_sklearn:.2f}s"
    )


if __name__ == "__main__":
    main()
