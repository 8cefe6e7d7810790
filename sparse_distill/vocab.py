"""The n-gram vocabulary: counting, top-|V| selection and vectorised featurisation into embedding-row ids.

Tokenisation: lowercase, then `TOKEN_PATTERN` (`(?u)\\w+|[^\\w\\s]`): runs of word characters, and each punctuation
mark or symbol as a token of its own ("don't!" is `don ' t !`), n-grams joined by one space. So the kept vocabulary
equals `CountVectorizer(token_pattern=TOKEN_PATTERN, ngram_range=(1, n), max_features=V)`'s. Marks and one-letter
words carry meaning on short texts ("!!!", "?", "$", "i", "a 5") that CountVectorizer's default pattern
(`LEGACY_TOKEN_PATTERN`, `(?u)\\b\\w\\w+\\b`) drops. Vocabularies saved with the legacy pattern (`vocab.json`
records it) still load and featurise with it, so their students keep their inputs.

Tie rule (`tie_rule`):
- "alphabetical" (default): rank by total count, descending; ties by the n-gram string in ascending code-point order.
  Deterministic on every machine and computable shard by shard.
- "sklearn": CountVectorizer's own rule, bit for bit. It sorts the n-grams alphabetically, then keeps
  `(-counts).argsort()[:V]`, numpy's default (unstable) sort, so which of several n-grams tied at the cut survive is
  numpy's choice. Use it to reproduce a CountVectorizer vocabulary exactly.
Both keep every n-gram whose count is above the count at the cut; they differ only among n-grams tied at the cut.
Row order in `vocab.parquet` is the ranking (count descending), and row i is embedding row i.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sparse_distill.data import atomic_write, atomic_write_parquet, atomic_write_text, file_checksum

if TYPE_CHECKING:
    from sparse_distill.config import VocabConfig

logger = logging.getLogger(__name__)

LOOKUP = "vocab.lookup.npz"
# Format of the saved lookup; a file of another version is rebuilt.
_LOOKUP_VERSION = 5

FeaturizeEngine = Literal["auto", "compiled", "python"]
# Up to this many texts, "auto" featurises in Python unless the kernel is loaded already: loading it (numba and
# the cached machine code) takes longer than featurising this many texts in Python.
PYTHON_FEATURIZE_MAX_TEXTS = 1000
# From this many texts per thread, the compiled featuriser splits the work over threads (see `_featurize_encoded`).
PARALLEL_FEATURIZE_MIN_TEXTS = 2000

# The kernel's hashing (see `ngram_kernels`) in Python integers: FNV-1a over a word's bytes, splitmix64's finaliser.
_MASK64 = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_GOLDEN = 0x9E3779B97F4A7C15


def _py_fnv1a(data: bytes) -> int:
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _MASK64
    return h


def _py_mix(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


TOKEN_PATTERN = r"(?u)\w+|[^\w\s]"
LEGACY_TOKEN_PATTERN = r"(?u)\b\w\w+\b"
TOKEN_PATTERNS = (TOKEN_PATTERN, LEGACY_TOKEN_PATTERN)
_token_res = {p: re.compile(p) for p in TOKEN_PATTERNS}


def tokenize(text: str, token_pattern: str = TOKEN_PATTERN) -> list[str]:
    """The student's tokens: lowercase, then every match of `token_pattern` (see the module docstring)."""
    return _token_res[check_token_pattern(token_pattern)].findall(text.lower())


def check_token_pattern(token_pattern: str, where: str = "token_pattern") -> str:
    """`token_pattern` itself when it is one of `TOKEN_PATTERNS`; else a ValueError that names `where` it came from."""
    if token_pattern not in _token_res:
        raise ValueError(f"{where}: unknown token pattern {token_pattern!r}; known: {', '.join(TOKEN_PATTERNS)}")
    return token_pattern


def iter_ngrams(tokens: list[str], ngram_max: int) -> Iterable[str]:
    """All word n-grams for n = 1..ngram_max, as CountVectorizer builds them (tokens joined by a space)."""
    yield from tokens
    for n in range(2, ngram_max + 1):
        yield from map(" ".join, zip(*(tokens[i:] for i in range(n)), strict=False))


def count_ngrams(
    texts: Iterable[str], ngram_max: int, counts: Counter[str] | None = None, token_pattern: str = TOKEN_PATTERN
) -> Counter[str]:
    """Total counts of every n-gram (n = 1..ngram_max) over the texts."""
    counts = Counter() if counts is None else counts
    for text in texts:
        counts.update(iter_ngrams(tokenize(text, token_pattern), ngram_max))
    return counts


def _re2_class(bits: np.ndarray, negated: bool) -> str:
    """An RE2 character class of the code points set in a `ngram_kernels` bitmap (or, negated, of all others)."""
    cps = np.flatnonzero(np.unpackbits(bits, bitorder="little"))
    gaps = np.flatnonzero(np.diff(cps) != 1)
    starts, stops = np.append(cps[0], cps[gaps + 1]), np.append(cps[gaps], cps[-1])
    ranges = "".join(
        f"\\x{{{a:x}}}-\\x{{{b:x}}}" if a != b else f"\\x{{{a:x}}}" for a, b in zip(starts, stops, strict=True)
    )
    return ("[^" if negated else "[") + ranges + "]"


# RE2 classes built from the code points that Python's regex calls word characters and spaces (`ngram_kernels`'
# bitmaps), so Arrow splits exactly where `tokenize` does (RE2's Unicode tables are newer).
@functools.cache
def _non_word_pattern() -> str:
    """Runs of what Python's `(?u)\\w` does not match: the legacy pattern's separators."""
    from sparse_distill.ngram_kernels import word_bits

    return _re2_class(word_bits(), negated=True) + "+"


@functools.cache
def _space_pattern() -> str:
    """Runs of what Python's `(?u)\\s` matches: the separators of `TOKEN_PATTERN`."""
    from sparse_distill.ngram_kernels import space_bits

    return _re2_class(space_bits(), negated=False) + "+"


@functools.cache
def _mark_pattern() -> str:
    """One character that is neither a word character nor a space, captured: a token of its own in `TOKEN_PATTERN`."""
    from sparse_distill.ngram_kernels import space_bits, word_bits

    return "(" + _re2_class(word_bits() | space_bits(), negated=True) + ")"


def _arrow_tokens(lowered: pa.Array, token_pattern: str) -> tuple[pa.Array, np.ndarray]:
    """Every token of the (lowercased) texts in order, and the index of the text each comes from."""
    if token_pattern == TOKEN_PATTERN:
        # Space each mark off, so that splitting at spaces leaves words and marks.
        lowered = pc.replace_substring_regex(lowered, _mark_pattern(), " \\1 ")
        parts = pc.split_pattern_regex(lowered, _space_pattern())
        shortest = 1
    else:
        parts = pc.split_pattern_regex(lowered, _non_word_pattern())
        shortest = 2
    flat = parts.flatten()
    keep = pc.greater_equal(pc.utf8_length(flat), shortest)
    return pc.filter(flat, keep), pc.filter(pc.list_parent_indices(parts), keep).to_numpy()


def count_ngram_table(texts: list[str], ngram_max: int, token_pattern: str = TOKEN_PATTERN) -> pa.Table:
    """Counts of every n-gram (n = 1..ngram_max) over the texts as an Arrow table (ngram, count), vectorised.

    Equals `count_ngrams` (the same tokens as `tokenize`): lowercase with Python's `str.lower` (which knows final
    sigma and dotted I), split into tokens with Arrow's regex kernels, join neighbouring tokens of one document into
    n-grams and count them with Arrow's hash aggregation: no per-n-gram Python loop.
    """
    lowered = pa.array([t.lower() for t in texts], pa.string())
    tokens, doc = _arrow_tokens(lowered, check_token_pattern(token_pattern))
    total = len(tokens)
    pieces = []
    for n in range(1, ngram_max + 1):
        if total < n:
            break
        # An n-gram starts at i when tokens i..i+n-1 belong to one document.
        same = np.ones(total - n + 1, dtype=bool)
        for j in range(1, n):
            same &= doc[j : total - n + 1 + j] == doc[: total - n + 1]
        start = np.nonzero(same)[0]
        cols = [pc.take(tokens, pa.array(start + j)) for j in range(n)]
        grams = cols[0] if n == 1 else pc.binary_join_element_wise(*cols, " ")
        pieces.append(pa.table({"ngram": grams}).group_by("ngram").aggregate([("ngram", "count")]))
    if not pieces:
        return pa.table({"ngram": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    table = pa.concat_tables(pieces)
    return pa.table({"ngram": table.column(0), "count": pc.cast(table.column(1), pa.int64())})


def merge_count_tables(tables: list[pa.Table]) -> pa.Table:
    """Sum (ngram, count) tables."""
    if len(tables) == 1:
        return tables[0]
    merged = pa.concat_tables(tables).group_by("ngram").aggregate([("count", "sum")])
    return pa.table({"ngram": merged.column("ngram"), "count": merged.column("count_sum")})


def count_ngram_table_stream(
    texts: Iterable[str], ngram_max: int, chunk: int = 10_000, token_pattern: str = TOKEN_PATTERN
) -> pa.Table:
    """`count_ngram_table` over a stream of texts, counted `chunk` documents at a time and merged."""
    total, batch = None, []
    for text in texts:
        batch.append(text)
        if len(batch) == chunk:
            part = count_ngram_table(batch, ngram_max, token_pattern)
            total = part if total is None else merge_count_tables([total, part])
            batch = []
    if batch or total is None:
        part = count_ngram_table(batch, ngram_max, token_pattern)
        total = part if total is None else merge_count_tables([total, part])
    return total


TieRule = Literal["alphabetical", "sklearn"]


def select_top_table(
    counts: pa.Table, size: int, min_count: int = 1, tie_rule: TieRule = "alphabetical"
) -> tuple[list[str], np.ndarray]:
    """`select_top` over an (ngram, count) table, vectorised: the kept n-grams in rank order and their counts."""
    if tie_rule not in ("alphabetical", "sklearn"):
        raise ValueError(f"tie_rule must be 'alphabetical' or 'sklearn', not {tie_rule!r}")
    if min_count > 1:
        counts = counts.filter(pc.greater_equal(counts.column("count"), min_count))
    # Arrow compares strings by UTF-8 bytes, which is code-point order: Python's string order.
    counts = counts.take(pc.sort_indices(counts, [("ngram", "ascending")]))
    c = counts.column("count").to_numpy()
    if tie_rule == "sklearn" and len(c) > size:
        order = (-c).argsort()[:size]  # numpy's default sort, exactly as CountVectorizer._limit_features
    else:
        order = np.argsort(-c, kind="stable")[:size]
    return counts.column("ngram").take(pa.array(order)).to_pylist(), c[order]


def select_top(
    counts: Counter[str] | dict[str, int], size: int, min_count: int = 1, tie_rule: TieRule = "alphabetical"
) -> list[tuple[str, int]]:
    """The top `size` n-grams by count, ranked count-descending; see the module docstring for the tie rule."""
    items = sorted((g, c) for g, c in counts.items() if c >= min_count)
    if tie_rule == "sklearn":
        if len(items) <= size:
            order = np.argsort(-np.array([c for _, c in items], dtype=np.int64), kind="stable")
        else:
            # Exactly CountVectorizer._limit_features: numpy's default sort over alphabetically ordered features.
            order = (-np.array([c for _, c in items], dtype=np.int64)).argsort()[:size]
        return [items[i] for i in order]
    if tie_rule != "alphabetical":
        raise ValueError(f"tie_rule must be 'alphabetical' or 'sklearn', not {tie_rule!r}")
    items.sort(key=lambda gc: -gc[1])  # stable: ties stay alphabetical
    return items[:size]


def cut_count(histogram: dict[int, int], size: int, min_count: int) -> tuple[int, int, int]:
    """From a histogram {count: n-grams}: the count at the cut, how many n-grams above it are kept, and how many of
    those tied at it. When fewer than `size` n-grams reach `min_count`, all of them are kept."""
    above = 0
    for c in sorted((c for c in histogram if c >= min_count), reverse=True):
        n = histogram[c]
        if above + n >= size:
            return c, above, size - above
        above += n
    return min_count, above, 0  # everything eligible is kept: no cut


def select_top_files(
    paths: list[Path], histogram: dict[int, int], size: int, min_count: int = 1, tie_rule: TieRule = "alphabetical"
) -> pa.Table:
    """`select_top` over (ngram, count) Parquet files that each hold distinct n-grams, given the histogram of all
    their counts: the kept (ngram, count) table in rank order, without holding every count in memory.

    "alphabetical" reads only the n-grams at or above the cut, and keeps at most `size` of the tied ones at a time.
    "sklearn" reproduces CountVectorizer's unstable tie order, which depends on every count, so it reads them all.
    """
    if tie_rule == "sklearn":
        table = pa.concat_tables([pq.read_table(p, filters=[("count", ">=", min_count)]) for p in paths])
        ngrams, kept = select_top_table(table, size, min_count, "sklearn")
        return pa.table({"ngram": pa.array(ngrams, pa.string()), "count": pa.array(kept, pa.int64())})
    cut, _, tied_wanted = cut_count(histogram, size, min_count)
    above_parts: list[pa.Table] = []
    tied = pa.table({"ngram": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    for path in paths:
        table = pq.read_table(path, filters=[("count", ">=", cut)])
        if tied_wanted == 0:
            above_parts.append(table)
            continue
        c = table.column("count")
        above_parts.append(table.filter(pc.greater(c, cut)))
        # Ties at the cut: keep the alphabetically first `tied_wanted` seen so far (bounded by |V|).
        tied = pa.concat_tables([tied, table.filter(pc.equal(c, cut))])
        tied = tied.take(pc.sort_indices(tied, [("ngram", "ascending")])[:tied_wanted])
    kept = pa.concat_tables([*above_parts, tied]).combine_chunks()
    return kept.take(pc.sort_indices(kept, [("count", "descending"), ("ngram", "ascending")]))


class KeyTable:
    """64-bit n-gram keys -> embedding rows: an open-addressing hash table (linear probing, load <= 1/4) with
    vectorised (numpy) inserts and lookups; the featuriser's compiled kernel probes the same two arrays. About 1.2
    probes per lookup, where a binary search over 1M sorted keys takes 20 dependent, cache-missing steps. A vectorised
    lookup loops until its longest probe chain ends: at load 1/2 that took 14 rounds for a batch of 600 keys
    (measured), at 1/4 a few."""

    def __init__(self, keys: np.ndarray, rows: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.uint64)
        capacity = 1 << max(4, int(np.ceil(np.log2(max(4 * len(keys), 1)))))
        self.mask = np.uint64(capacity - 1)
        self.keys = np.zeros(capacity, np.uint64)  # 0 marks an empty slot
        self.rows = np.full(capacity, -1, np.int64)
        if np.any(keys == 0):
            raise ValueError("an n-gram key is 0, the empty-slot marker: report this as a bug")
        slot = keys & self.mask
        todo = np.arange(len(keys))
        while len(todo):
            s = slot[todo]
            free = self.keys[s] == 0
            # One winner per free slot; the others move on to the next slot like every item that met a full one.
            won_slots, first = np.unique(s[free], return_index=True)
            winners = todo[free][first]
            self.keys[won_slots] = keys[winners]
            self.rows[won_slots] = rows[winners]
            placed = np.zeros(len(keys), dtype=bool)
            placed[winners] = True
            todo = todo[~placed[todo]]
            slot[todo] = (slot[todo] + np.uint64(1)) & self.mask

    @classmethod
    def from_arrays(cls, keys: np.ndarray, rows: np.ndarray) -> KeyTable:
        """A table saved as its two slot arrays (a power-of-two length)."""
        table = cls.__new__(cls)
        if len(keys) & (len(keys) - 1) or len(keys) != len(rows):
            raise ValueError("not a saved key table: slot arrays of a power-of-two length expected")
        table.keys, table.rows = np.asarray(keys, np.uint64), np.asarray(rows, np.int64)
        table.mask = np.uint64(len(keys) - 1)
        return table

    def get(self, query: np.ndarray) -> np.ndarray:
        """The row of each key, -1 where absent."""
        out = np.full(len(query), -1, np.int64)
        idx = np.arange(len(query))
        q = np.asarray(query, dtype=np.uint64)
        slot = q & self.mask
        while len(idx):
            k = self.keys[slot]
            hit = k == q
            out[idx[hit]] = self.rows[slot[hit]]
            more = ~hit & (k != 0)
            idx, q, slot = idx[more], q[more], (slot[more] + np.uint64(1)) & self.mask
        return out


@dataclass(frozen=True)
class Subwords:
    """fastText's subwords: the character n-grams (n = min_n..max_n) of each word wrapped in `<` and `>`, each
    hashed (FNV-1a of its UTF-8 bytes, then splitmix64) into one of `buckets` embedding rows. A word the train set
    lacks still gets the rows of its pieces ("unfunny" shares "<unf", "funn", "unny" ...), so the student is not
    blind to it."""

    min_n: int
    max_n: int
    buckets: int

    def __post_init__(self) -> None:
        if self.buckets and not 2 <= self.min_n <= self.max_n:
            raise ValueError(f"subwords need 2 <= min_n <= max_n, got {self.min_n}..{self.max_n}")

    def pieces(self, word: str) -> list[str]:
        """The word's character n-grams, in the kernel's order: by length, then left to right."""
        wrapped = f"<{word}>"
        return [wrapped[c : c + n] for n in range(self.min_n, self.max_n + 1) for c in range(len(wrapped) - n + 1)]

    def rows(self, words: list[str], base: int) -> np.ndarray:
        """Embedding rows of the words' character n-grams (after `base` n-gram rows), in the kernel's order."""
        rows = [
            base + _py_mix(_py_fnv1a(piece.encode("utf-8", "surrogatepass"))) % self.buckets
            for word in words
            for piece in self.pieces(word)
        ]
        return np.asarray(rows, np.int64)

    def describe(self) -> str:
        """In words, for a run's summary: "200,000 rows for the words' character 4-grams"."""
        lengths = str(self.min_n) if self.min_n == self.max_n else f"{self.min_n}-{self.max_n}"
        return f"{self.buckets:,} rows for the words' character {lengths}-grams"

    def to_json(self) -> dict[str, int]:
        return {"min_n": self.min_n, "max_n": self.max_n, "buckets": self.buckets}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Subwords | None:
        """Subwords as `vocab.json` records them (None, or 0 buckets: none)."""
        if not data or not int(data["buckets"]):
            return None
        return cls(int(data["min_n"]), int(data["max_n"]), int(data["buckets"]))

    @classmethod
    def from_config(cls, config: VocabConfig) -> Subwords | None:
        """The subwords a vocabulary section asks for (None when `subword_buckets` is 0)."""
        if not config.subword_buckets:
            return None
        return cls(config.subword_min, config.subword_max, config.subword_buckets)


@dataclass
class NgramVocab:
    """The kept n-grams (row i = embedding row i), their counts, and the n-gram key -> row table that featurising
    probes (see `ngram_kernels`)."""

    ngrams: list[str]
    counts: np.ndarray
    ngram_max: int
    # (table keys, table rows, prefix_closed) read from disk, instead of building them
    saved_lookup: InitVar[tuple[np.ndarray, np.ndarray, bool] | None] = None
    # Character n-grams of each word (fastText's subwords), hashed into `subwords.buckets` rows after the n-grams.
    subwords: Subwords | None = None
    # How texts were cut into tokens when the n-grams were counted; featurising cuts them the same way.
    token_pattern: str = TOKEN_PATTERN
    _table: KeyTable = field(init=False, repr=False)
    # Every kept n-gram's (n-1)-word prefix is kept too (true of any top-|V| cut with the alphabetical tie rule,
    # since a prefix occurs at least as often and sorts first): featurising then extends only the n-grams it found.
    _prefix_closed: bool = field(init=False, repr=False, default=False)

    def __post_init__(self, saved_lookup: tuple[np.ndarray, np.ndarray, bool] | None) -> None:
        self.counts = np.asarray(self.counts, dtype=np.int64)
        check_token_pattern(self.token_pattern)
        if saved_lookup is None:
            self._build_lookup()
        else:
            table_keys, table_rows, self._prefix_closed = saved_lookup
            self._table = KeyTable.from_arrays(table_keys, table_rows)

    def __len__(self) -> int:
        """Rows of the embedding table: the kept n-grams, then the subword buckets."""
        return len(self.ngrams) + (self.subwords.buckets if self.subwords else 0)

    def row_names(self, text: str) -> dict[int, str]:
        """What each embedding row that `text` uses stands for: its n-gram, or for a subword bucket the text's
        character n-grams hashed into it (`<unf|funn` ...)."""
        ids, _ = self._featurize_python([text], self.ngram_max, with_subwords=False)
        names = {int(r): self.ngrams[r] for r in ids}
        if self.subwords is not None:
            pieces: dict[int, list[str]] = {}
            for word in tokenize(text, self.token_pattern):
                grams = self.subwords.pieces(word)
                for gram, row in zip(grams, self.subwords.rows([word], len(self.ngrams)), strict=True):
                    if gram not in pieces.setdefault(int(row), []):
                        pieces[int(row)].append(gram)
            names.update({row: "|".join(grams) for row, grams in pieces.items()})
        return names

    def _build_lookup(self) -> None:
        # Key every n-gram by the hashes of its words' bytes (compiled, no per-n-gram Python loop) into a hash table.
        keys, _, prefix = _string_keys(self.ngrams)
        if len(np.unique(keys)) != len(keys):
            raise ValueError("two n-grams share a 64-bit key: report this as a bug")
        self._table = KeyTable(keys, np.arange(len(keys), dtype=np.int64))
        self._prefix_closed = bool(np.all(self._table.get(prefix[prefix != 0]) >= 0))

    def lookup(self, ngrams: list[str]) -> np.ndarray:
        """Row ids of n-grams given as strings (words joined by one space); -1 where not in the vocabulary."""
        keys, words, _ = _string_keys(ngrams)
        rows = self._table.get(keys)
        rows[words > self.ngram_max] = -1
        return rows

    def featurize(
        self, texts: list[str], max_order: int | None = None, engine: FeaturizeEngine = "compiled"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embedding-bag inputs for documents: flat row ids and per-document start offsets (int64).

        Each document contributes one id per occurrence of a kept n-gram (n = 1..ngram_max), so mean pooling weights
        n-grams by frequency, as a bag of n-grams should. `max_order` uses only n-grams up to that length (the
        n-gram-order ablation: a student trained on 4-grams evaluated on 1- and 2-grams).

        With `subwords`, each word's character n-grams follow the document's n-grams (see `Subwords`); they do not
        depend on `max_order`.

        Tokens are `tokenize`'s (with the vocabulary's `token_pattern`), found by the compiled kernel in the texts'
        UTF-8 bytes: it lowercases ASCII letters (other texts are lowercased by `str.lower` first) and tells word
        characters and spaces by bitmaps of the code points that Python's `\\w` and `\\s` match.

        `engine`: "compiled" (default: the numba kernel); "python" (the same keys and ids from `tokenize` and a Python
        hash loop: no numba import and no kernel load, about a second of start-up, at some tens of microseconds per
        short text); or "auto": the kernel once it is loaded or for more than `PYTHON_FEATURIZE_MAX_TEXTS` texts, else
        Python.
        """
        top = self.ngram_max if max_order is None else min(max_order, self.ngram_max)
        if top < 1:
            raise ValueError(f"max_order must be >= 1, got {max_order}")
        if engine == "auto":
            small = len(texts) <= PYTHON_FEATURIZE_MAX_TEXTS
            engine = "python" if small and "sparse_distill.ngram_kernels" not in sys.modules else "compiled"
        if engine == "python":
            return self._featurize_python(texts, top)
        if engine != "compiled":
            raise ValueError(f"engine must be auto, compiled or python, not {engine!r}")
        return self._featurize_encoded(*encode_texts(texts), top)

    def _featurize_python(
        self, texts: list[str], max_order: int, with_subwords: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """`featurize` without the kernel: the same word keys, n-gram keys and id order (unigrams in text order, then
        bigrams, ...), looked up in the same hash table; the subwords' rows after them unless `with_subwords` is off."""
        ids: list[np.ndarray] = []
        offsets = np.zeros(len(texts), np.int64)
        total = 0
        for d, text in enumerate(texts):
            offsets[d] = total
            tokens = tokenize(text, self.token_pattern)
            words = [_py_mix(_py_fnv1a(w.encode("utf-8", "surrogatepass"))) for w in tokens]
            keys: list[int] = []
            current = [_GOLDEN] * len(words)
            for n in range(1, max_order + 1):
                for j in range(len(words) - n + 1):
                    current[j] = _py_mix(current[j] ^ words[j + n - 1])
                    keys.append(current[j])
            if keys:
                rows = self._table.get(np.array(keys, np.uint64))
                rows = rows[rows >= 0]
                ids.append(rows)
                total += len(rows)
            if self.subwords is not None and with_subwords:
                sub = self.subwords.rows(tokens, len(self.ngrams))
                ids.append(sub)
                total += len(sub)
        return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), offsets

    def _featurize_encoded(
        self, buf: np.ndarray, ends: np.ndarray, max_order: int, threads: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`featurize` of texts already encoded by `encode_texts` (max_order 0 only tokenises and hashes).

        Many texts are cut into contiguous chunks featurised by `threads` threads at once (the kernel releases the
        GIL; default: numba's thread count), and the chunks joined in order: the same ids and offsets as one call.
        """
        from sparse_distill.ngram_kernels import BYTE_FOLD, featurize_bytes, space_bits, word_bits

        table, bits, spaces = self._table, word_bits(), space_bits()
        marks = self.token_pattern == TOKEN_PATTERN
        sub = self.subwords if self.subwords is not None and max_order > 0 else Subwords(0, 0, 0)

        def run(chunk_buf: np.ndarray, chunk_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return featurize_bytes(
                chunk_buf,
                chunk_ends,
                BYTE_FOLD,
                bits,
                spaces,
                marks,
                table.keys,
                table.rows,
                max_order,
                self._prefix_closed,
                sub.min_n,
                sub.max_n,
                sub.buckets,
                len(self.ngrams),
            )

        if threads is None:
            import numba

            threads = numba.get_num_threads()
        chunks = min(threads, len(ends) // PARALLEL_FEATURIZE_MIN_TEXTS)
        if chunks < 2:
            return run(buf, ends)
        # Cut at text boundaries into chunks of about equal bytes.
        cuts = np.searchsorted(ends, np.linspace(0, ends[-1], chunks + 1)[1:-1], side="left")
        bounds = [0, *sorted({int(c) + 1 for c in cuts if 0 <= c < len(ends) - 1}), len(ends)]
        parts = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            start = int(ends[lo - 1]) if lo else 0
            parts.append((buf[start : int(ends[hi - 1])], ends[lo:hi] - start))
        with ThreadPoolExecutor(len(parts)) as pool:
            results = list(pool.map(lambda part: run(*part), parts))
        shifts = np.cumsum([0, *(len(ids) for ids, _ in results[:-1])])
        ids = np.concatenate([ids for ids, _ in results])
        offsets = np.concatenate([offsets + shift for (_, offsets), shift in zip(results, shifts, strict=True)])
        return ids, offsets

    def top(self, size: int) -> NgramVocab:
        """The vocabulary cut to its first `size` rows (the most frequent n-grams): row i keeps its id."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if size >= len(self.ngrams):
            return self
        return NgramVocab(
            ngrams=self.ngrams[:size],
            counts=self.counts[:size],
            ngram_max=self.ngram_max,
            subwords=self.subwords,
            token_pattern=self.token_pattern,
        )

    def save(self, out_dir: str | Path) -> Path:
        """Write `vocab.parquet` (ngram, count; row order = embedding row) and `vocab.json` (settings)."""
        table = pa.table({"ngram": pa.array(self.ngrams, pa.string()), "count": pa.array(self.counts, pa.int64())})
        extra = {"subwords": self.subwords.to_json()} if self.subwords else None
        path = write_vocab(table, self.ngram_max, out_dir, extra, self.token_pattern)
        self._save_lookup(Path(out_dir))
        return path

    def _save_lookup(self, out_dir: Path) -> None:
        checksum = np.frombuffer(file_checksum(out_dir / "vocab.parquet").encode(), dtype=np.uint8)
        arrays = {
            "keys": self._table.keys,
            "rows": self._table.rows,
            "prefix_closed": np.array([self._prefix_closed]),
            "vocab_sha256": checksum,
            "version": np.array([_LOOKUP_VERSION]),
        }
        # The temporary name ends in .npz too: np.savez would add it otherwise.
        atomic_write(out_dir / LOOKUP, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")

    @classmethod
    def load(cls, out_dir: str | Path) -> NgramVocab:
        """Load a vocabulary written by `save` or by the counting job.

        A `vocab.json` without `token_pattern` (none written by this library lacks it) is read as the legacy pattern.
        The n-gram -> row lookup is read from `vocab.lookup.npz` when it was made from this very `vocab.parquet`
        (checked by its SHA-256); otherwise it is built and saved there for the next load (when the folder is
        writable), so training, evaluation and inference share one lookup.
        """
        out_dir = Path(out_dir)
        meta = json.loads((out_dir / "vocab.json").read_text())
        table = pq.read_table(out_dir / "vocab.parquet")
        lookup = _read_lookup(out_dir)
        vocab = cls(
            ngrams=table.column("ngram").to_pylist(),
            counts=table.column("count").to_numpy(),
            ngram_max=int(meta["ngram_max"]),
            saved_lookup=lookup,
            subwords=Subwords.from_json(meta.get("subwords")),
            token_pattern=check_token_pattern(
                meta.get("token_pattern", LEGACY_TOKEN_PATTERN), f"{out_dir / 'vocab.json'}: token_pattern"
            ),
        )
        if lookup is None:
            try:
                vocab._save_lookup(out_dir)
            except OSError as e:  # a read-only model folder: the lookup is simply rebuilt on each load
                logger.debug("%s: could not save the lookup (%s)", out_dir, e)
        return vocab


def build_vocab(
    texts: Iterable[str],
    size: int,
    ngram_max: int,
    min_count: int = 1,
    tie_rule: TieRule = "alphabetical",
    token_pattern: str = TOKEN_PATTERN,
) -> NgramVocab:
    """Count n-grams over the texts and keep the top `size` (see the module docstring for the tie rule)."""
    counts = count_ngram_table_stream(texts, ngram_max, token_pattern=token_pattern)
    return vocab_from_table(counts, size, ngram_max, min_count, tie_rule, token_pattern)


def vocab_from_table(
    counts: pa.Table,
    size: int,
    ngram_max: int,
    min_count: int = 1,
    tie_rule: TieRule = "alphabetical",
    token_pattern: str = TOKEN_PATTERN,
) -> NgramVocab:
    """Keep the top `size` n-grams of an (ngram, count) table (counted with `token_pattern`) as a vocabulary."""
    ngrams, kept = select_top_table(counts, size, min_count, tie_rule)
    logger.info("vocabulary: %d distinct n-grams, kept %d", counts.num_rows, len(ngrams))
    return NgramVocab(ngrams=ngrams, counts=kept, ngram_max=ngram_max, token_pattern=token_pattern)


def write_vocab(
    table: pa.Table,
    ngram_max: int,
    out_dir: str | Path,
    extra: dict | None = None,
    token_pattern: str = TOKEN_PATTERN,
) -> Path:
    """Write a ranked (ngram, count) table, counted with `token_pattern`, as `vocab.parquet` (row i = embedding row
    i) and its `vocab.json`."""
    out_dir = Path(out_dir)
    table = pa.table(
        {"ngram": pc.cast(table.column("ngram"), pa.string()), "count": pc.cast(table.column("count"), pa.int64())}
    )
    atomic_write_parquet(table, out_dir / "vocab.parquet")
    meta = {"ngram_max": ngram_max, "size": table.num_rows, "token_pattern": token_pattern, "lowercase": True}
    atomic_write_text(out_dir / "vocab.json", json.dumps({**meta, **(extra or {})}, indent=2))
    return out_dir / "vocab.parquet"


def add_words(out_dir: str | Path, texts: Iterable[str]) -> int:
    """Append the texts' tokens (cut with the saved vocabulary's own pattern) that the vocabulary in `out_dir` lacks,
    as rows after its counted n-grams with count 0, and save it again (settings kept, `added_words` recorded).
    Returns how many were added."""
    out_dir = Path(out_dir)
    vocab = NgramVocab.load(out_dir)
    known = set(vocab.ngrams)
    new: list[str] = []
    for text in texts:
        for w in tokenize(text, vocab.token_pattern):
            if w not in known:
                known.add(w)
                new.append(w)
    if not new:
        return 0
    ngrams = vocab.ngrams + sorted(new)
    counts = np.concatenate([vocab.counts, np.zeros(len(new), np.int64)])
    extended = NgramVocab(ngrams, counts, vocab.ngram_max, token_pattern=vocab.token_pattern)
    meta = json.loads((out_dir / "vocab.json").read_text())
    meta["added_words"] = meta.get("added_words", 0) + len(new)
    table = pa.table({"ngram": pa.array(ngrams, pa.string()), "count": pa.array(extended.counts, pa.int64())})
    kept = {k: v for k, v in meta.items() if k not in ("ngram_max", "size", "token_pattern")}
    write_vocab(table, vocab.ngram_max, out_dir, kept, vocab.token_pattern)
    extended._save_lookup(out_dir)
    logger.info("%s: %d words added after the %d counted n-grams", out_dir, len(new), len(vocab.ngrams))
    return len(new)


def set_subwords(out_dir: str | Path, subwords: Subwords | None) -> None:
    """Record in the saved vocabulary's `vocab.json` which subwords its students use (None: none)."""
    path = Path(out_dir) / "vocab.json"
    meta = json.loads(path.read_text())
    meta.pop("subwords", None)
    if subwords is not None:
        meta["subwords"] = subwords.to_json()
    atomic_write_text(path, json.dumps(meta, indent=2))


def encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The featuriser's input: the texts' UTF-8 bytes back to back and where each text ends. Non-ASCII texts are
    lowercased here by `str.lower` (Unicode case rules are Python's to define); the kernel lowercases ASCII itself."""
    data = [t.encode() if t.isascii() else t.lower().encode("utf-8", "surrogatepass") for t in texts]
    ends = np.cumsum(np.fromiter(map(len, data), np.int64, len(data)))
    return np.frombuffer(b"".join(data), np.uint8), ends


def _string_keys(ngrams: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys, word counts and prefix keys of n-gram strings (see `ngram_kernels.ngram_keys`)."""
    from sparse_distill.ngram_kernels import ngram_keys

    data = [g.encode() for g in ngrams]
    ends = np.cumsum(np.fromiter(map(len, data), np.int64, len(data)))
    return ngram_keys(np.frombuffer(b"".join(data), np.uint8), ends)


def _read_lookup(out_dir: Path) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """The saved lookup, if it belongs to this folder's `vocab.parquet`."""
    path = out_dir / LOOKUP
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if "version" not in z or int(z["version"][0]) != _LOOKUP_VERSION:
                return None
            if z["vocab_sha256"].tobytes().decode() != file_checksum(out_dir / "vocab.parquet"):
                return None
            return z["keys"], z["rows"], bool(z["prefix_closed"][0])
    except (OSError, ValueError, KeyError) as e:
        logger.warning("%s: unreadable lookup, rebuilding it (%s)", path, e)
        return None
