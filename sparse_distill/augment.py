"""Text perturbations: augmenting a train set when there is no unlabelled corpus, and shuffling words to measure a
task's sensitivity to word order.

Augmentation follows EDA (Wei & Zou 2019) without a thesaurus (none ships offline): random word replacement by a word
drawn from the train set's own vocabulary, random deletion and random swap; and n-gram sampling (Tang et al. 2019):
a random contiguous span of the text. Neighbour replacement swaps words for their nearest words in the teacher's own
input-embedding space (TinyBERT's augmentation, with the teacher's vectors instead of GloVe): it is the one method that
brings words the train set never had, so the student learns them from the teacher. The augmented texts carry no gold
label; the teacher labels them, and each keeps the train rows it was made from, so their gold labels can count too.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

AugmentMethod = Literal["eda", "ngram"]
TransferMethod = Literal["eda", "ngram", "dropout", "mix", "neighbour"]
TRANSFER_METHODS: tuple[str, ...] = ("eda", "ngram", "dropout", "mix", "neighbour")
EDA_OPS = ("replace", "delete", "swap")


def _words(text: str) -> list[str]:
    return text.split()


def eda(text: str, rng: random.Random, pool: Sequence[str], alpha: float = 0.1) -> str:
    """One EDA edit of the text: replace, delete or swap about `alpha` of its words (at least one).

    `pool` is the word list replacements are drawn from (e.g. the train set's words, by frequency).
    """
    words = _words(text)
    if len(words) < 2:
        return text
    n = max(1, round(alpha * len(words)))
    op = rng.choice(EDA_OPS)
    if op == "replace" and pool:
        for i in rng.sample(range(len(words)), min(n, len(words))):
            words[i] = rng.choice(pool)
    elif op == "delete":
        drop = set(rng.sample(range(len(words)), min(n, len(words) - 1)))
        words = [w for i, w in enumerate(words) if i not in drop]
    else:
        for _ in range(n):
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
    return " ".join(words)


def ngram_sample(text: str, rng: random.Random, min_words: int = 1, max_words: int | None = None) -> str:
    """A random contiguous span of the text, `min_words` to `max_words` long (default: up to the whole text)."""
    words = _words(text)
    if len(words) <= min_words:
        return text
    top = len(words) if max_words is None else min(max_words, len(words))
    size = rng.randint(min_words, max(min_words, top))
    start = rng.randrange(len(words) - size + 1)
    return " ".join(words[start : start + size])


def word_dropout(text: str, rng: random.Random, rate: float = 0.2) -> str:
    """The text with each word dropped with probability `rate` (at least one word kept)."""
    words = _words(text)
    kept = [w for w in words if rng.random() >= rate]
    return " ".join(kept or [rng.choice(words)]) if words else text


def mix_texts(first: str, second: str, rng: random.Random) -> str:
    """A leading span of one text joined to a trailing span of another (sentence mixing): the teacher's label of the
    mix is a blend, which teaches the student how evidence from different texts combines."""
    return mix_spans(first, second, rng)[0]


def mix_spans(first: str, second: str, rng: random.Random) -> tuple[str, float]:
    """`mix_texts`, and the share of the mix's words that come from `first`."""
    a, b = _words(first), _words(second)
    if not a or not b:
        return (first, 1.0) if a else (second, 0.0)
    head, tail = a[: rng.randint(1, len(a))], b[rng.randrange(len(b)) :]
    return " ".join(head + tail), len(head) / (len(head) + len(tail))


# A word as replacement sees it: punctuation around it is kept, the core is looked up lower-cased.
_WORD_CORE = re.compile(r"^(\W*)(.*?)(\W*)$", re.S)


def nearest_words(
    vocabulary: Sequence[str], vectors: np.ndarray, queries: Sequence[str], k: int = 8, chunk: int = 2048
) -> dict[str, list[str]]:
    """The `k` nearest words (cosine similarity of `vectors`, one row per `vocabulary` word) of each query word found
    in `vocabulary`; queries not in it are left out. Done in chunks, so memory is `chunk` x |vocabulary|."""
    index = {w: i for i, w in enumerate(vocabulary)}
    found = sorted({q for q in queries if q in index})
    if not found or k < 1:
        return {}
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    unit = unit.astype(np.float32, copy=False)
    top = min(k + 1, len(vocabulary))
    out: dict[str, list[str]] = {}
    for start in range(0, len(found), chunk):
        part = found[start : start + chunk]
        rows = np.array([index[q] for q in part])
        sims = unit[rows] @ unit.T
        sims[np.arange(len(part)), rows] = -np.inf  # a word is not its own neighbour
        best = np.argpartition(-sims, top - 1, axis=1)[:, :top]
        for q, cand, row in zip(part, best, sims, strict=True):
            ranked = cand[np.argsort(-row[cand])]
            out[q] = [vocabulary[j] for j in ranked if np.isfinite(row[j])][:k]
    return out


def replaceable_words(texts: Sequence[str], skip_top: int = 100) -> set[str]:
    """The lower-cased words of the texts that neighbour replacement may change: all but the `skip_top` most frequent
    (function words, whose neighbours make broken text and bring no new content words), and never more than a tenth
    of the distinct words skipped (a tiny vocabulary keeps most of its words)."""
    counts: dict[str, int] = {}
    for text in texts:
        for w in _words(text):
            core = _WORD_CORE.match(w).group(2).lower()  # type: ignore[union-attr]
            if core:
                counts[core] = counts.get(core, 0) + 1
    frequent = sorted(counts, key=lambda w: (-counts[w], w))[: min(skip_top, len(counts) // 10)]
    return set(counts) - set(frequent)


def neighbour_replace(text: str, rng: random.Random, neighbours: Mapping[str, Sequence[str]], rate: float = 0.3) -> str:
    """The text with each word that has neighbours replaced by one of them with probability `rate` (at least one
    replaced when any can be). Punctuation around a word is kept, and a capital first letter too."""
    words = _words(text)
    parts = [_WORD_CORE.match(w).groups() for w in words]  # type: ignore[union-attr]
    can = [i for i, (_, core, _) in enumerate(parts) if core.lower() in neighbours]
    if not can:
        return text
    chosen = [i for i in can if rng.random() < rate] or [rng.choice(can)]
    for i in chosen:
        head, core, tail = parts[i]
        new = rng.choice(list(neighbours[core.lower()]))
        if core[:1].isupper():
            new = new[:1].upper() + new[1:]
        words[i] = head + new + tail
    return " ".join(words)


# Where a transfer text comes from: (train row, share of the text's words taken from it) for each of its sources (a mix
# has two). It lets the train rows' gold labels follow their copies into distillation (distill.gold_weight).
Origin = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class TransferSet:
    """Texts made from the train texts, each with the train rows it was made from (`origins`, one per text)."""

    texts: list[str]
    origins: list[Origin]


def make_transfer_copies(
    texts: Sequence[str],
    size: int,
    methods: Sequence[str] = TRANSFER_METHODS,
    seed: int = 13,
    alpha: float = 0.1,
    dropout: float = 0.2,
    pool_size: int = 10_000,
    neighbours: Mapping[str, Sequence[str]] | None = None,
    replace_rate: float = 0.3,
) -> TransferSet:
    """`size` new texts made from the train texts, and the rows of `texts` each was made from.

    Source texts are taken in a seeded shuffled order, cycling through them all before any repeats; each copy is made
    by one method drawn at random from `methods`: EDA without a thesaurus, an n-gram span (Tang et al. 2019), word
    dropout, a mix of two texts, or neighbour replacement (`neighbours`: word -> nearby words, see `nearest_words`;
    the method is skipped when there are none). Copies that equal their source are kept (rare); the output has
    exactly `size` texts, so a seed gives the same set every time.
    """
    unknown = sorted(set(methods) - set(TRANSFER_METHODS))
    if unknown or not methods:
        raise ValueError(f"unknown transfer methods {unknown} (choose from {', '.join(TRANSFER_METHODS)})")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    rows = [i for i, t in enumerate(texts) if t.strip()]
    sources = [texts[i] for i in rows]
    if not sources or size == 0:
        return TransferSet([], [])
    rng = random.Random(seed)
    pool = [w for t in rng.sample(sources, min(len(sources), pool_size)) for w in _words(t)]
    if "neighbour" in methods and not neighbours:
        logger.warning("transfer set: no word neighbours given, so no neighbour replacement")
        methods = [m for m in methods if m != "neighbour"] or ["eda"]
    out: list[str] = []
    origins: list[Origin] = []
    order: list[int] = []
    while len(out) < size:
        if not order:
            order = list(range(len(sources)))
            rng.shuffle(order)
        k = order.pop()
        text, origin = sources[k], ((rows[k], 1.0),)
        method = rng.choice(list(methods))
        if method == "eda":
            text = eda(text, rng, pool, alpha)
        elif method == "ngram":
            text = ngram_sample(text, rng)
        elif method == "dropout":
            text = word_dropout(text, rng, dropout)
        elif method == "neighbour":
            text = neighbour_replace(text, rng, neighbours or {}, replace_rate)
        else:
            other = rng.randrange(len(sources))
            text, share = mix_spans(text, sources[other], rng)
            origin = tuple((r, w) for r, w in ((rows[k], share), (rows[other], 1.0 - share)) if w > 0)
        out.append(text)
        origins.append(origin)
    logger.info("transfer set: %d texts from %d train texts (%s)", len(out), len(sources), ", ".join(methods))
    return TransferSet(out, origins)


def augment_texts(
    texts: Sequence[str],
    per_text: int,
    method: AugmentMethod,
    seed: int = 13,
    alpha: float = 0.1,
    pool_size: int = 10_000,
) -> list[str]:
    """`per_text` augmented copies of every text, in order, with `method` ("eda" or "ngram").

    Copies identical to their source are kept (they are rare and harmless): the output always has
    `per_text * len(texts)` texts, so runs are the same size from seed to seed.
    """
    if per_text < 1:
        raise ValueError(f"per_text must be >= 1, got {per_text}")
    rng = random.Random(seed)
    pool: list[str] = []
    if method == "eda":
        # Replacement words come from the texts themselves, weighted by frequency (a sample keeps it cheap).
        for text in rng.sample(list(texts), min(len(texts), pool_size)):
            pool.extend(_words(text))
    out = []
    for text in texts:
        for _ in range(per_text):
            if method == "eda":
                out.append(eda(text, rng, pool, alpha))
            elif method == "ngram":
                out.append(ngram_sample(text, rng))
            else:
                raise ValueError(f"unknown augmentation method {method!r} (eda, ngram)")
    logger.info("augmented %d texts into %d (%s)", len(texts), len(out), method)
    return out


def shuffle_words(texts: Sequence[str], seed: int = 13) -> list[str]:
    """Each text with its words in a random order (the word-order-sensitivity probe)."""
    rng = random.Random(seed)
    out = []
    for text in texts:
        words = _words(text)
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


def word_order_sensitivity(accuracy_shuffled: float) -> float:
    """WOS = (100 - p) / 50, with p the teacher's accuracy (in %) on shuffled texts ("The unreasonable effectiveness
    of distillation"): 0 when shuffling costs nothing, 1 when a binary task falls to chance."""
    return (100.0 - 100.0 * accuracy_shuffled) / 50.0
