"""Hold out a dev set from IMDB train, so that checkpoint selection never sees the test split.

    python benchmarks/make_imdb_split.py ../shared/data/imdb data/imdb-split --dev 2000

Writes train.parquet (the rest of train), dev.parquet (a seeded random sample of train), and copies test.parquet and
unsup.parquet unchanged.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="Folder with IMDB train/test/unsup.parquet")
    parser.add_argument("out", type=Path, help="Output folder")
    parser.add_argument("--dev", type=int, default=2000, help="Train reviews held out as dev")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    train = pq.read_table(args.src / "train.parquet")
    order = np.random.default_rng(args.seed).permutation(train.num_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    pq.write_table(train.take(pa.array(np.sort(order[args.dev :]))), args.out / "train.parquet")
    pq.write_table(train.take(pa.array(np.sort(order[: args.dev]))), args.out / "dev.parquet")
    for name in ("test.parquet", "unsup.parquet"):
        shutil.copy2(args.src / name, args.out / name)
    print(f"{args.out}: train {train.num_rows - args.dev}, dev {args.dev}")


if __name__ == "__main__":
    main()
