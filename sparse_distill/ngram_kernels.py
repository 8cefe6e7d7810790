"""Compiled (numba) kernels of the featuriser: UTF-8 bytes in, embedding-row ids out, in one pass with no Python
object per token or n-gram.

A word's key is a hash of its UTF-8 bytes, so featurising needs no word table: FNV-1a over the bytes, then the
splitmix64 finaliser. An n-gram's key is built left to right, key(w1..wn) = mix(key(w1..wn-1) ^ wordkey(wn)) with
key() = GOLDEN, and looked up in an open-addressing table (linear probing) of the vocabulary's keys.

The kernels release the GIL, so threads featurise batches side by side.
"""

from __future__ import annotations

import functools
import re

import numpy as np
from numba import njit

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
# splitmix64 constants: a strong 64-bit mixer, so keys do not collide in practice (collisions are checked on build).
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_ONE = np.uint64(1)


def _byte_fold() -> np.ndarray:
    """ASCII byte -> folded byte: letters lowercased, digits and `_` kept, every other ASCII byte 0 (not a word
    character). Bytes >= 0x80 are not looked up here: they start or continue a multi-byte character."""
    fold = np.zeros(256, np.uint8)
    for b in range(128):
        c = chr(b)
        if c.isdigit() or c == "_" or "a" <= c <= "z":
            fold[b] = b
        elif "A" <= c <= "Z":
            fold[b] = b + 32
    return fold


def _code_point_bits(pattern: str) -> np.ndarray:
    """One bit per code point (little-endian within each byte): set where the Python regex `pattern` matches it."""
    every = np.arange(0x110000, dtype=np.uint32).tobytes().decode("utf-32-le", "surrogatepass")
    hit = np.zeros(0x110000, bool)
    hit[np.fromiter((m.start() for m in re.finditer(pattern, every)), np.int64)] = True
    return np.packbits(hit, bitorder="little")


@functools.cache
def word_bits() -> np.ndarray:
    """The code points that Python's `(?u)\\w` matches, found by that very regex, so the kernel splits words exactly
    where `tokenize` does."""
    return _code_point_bits(r"(?u)\w")


@functools.cache
def space_bits() -> np.ndarray:
    """The code points that Python's `(?u)\\s` matches: with marks on, what separates tokens (every other non-word
    character is a token of its own)."""
    return _code_point_bits(r"(?u)\s")


BYTE_FOLD = _byte_fold()


@njit(inline="always", cache=True)
def mix(x: np.uint64) -> np.uint64:
    """splitmix64's finaliser, of one key or (called from Python) of an array of keys."""
    x = x ^ (x >> _S30)
    x = x * _M1
    x = x ^ (x >> _S27)
    x = x * _M2
    return x ^ (x >> _S31)


@njit(inline="always")
def _probe(key: np.uint64, table_keys: np.ndarray, table_rows: np.ndarray, mask: np.uint64) -> np.int64:
    slot = key & mask
    while True:
        k = table_keys[slot]
        if k == key:
            return table_rows[slot]
        if k == 0:  # an empty slot ends the probe chain
            return np.int64(-1)
        slot = (slot + _ONE) & mask


@njit(nogil=True, cache=True)
def ngram_keys(buf: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys of n-grams given as UTF-8 strings (words separated by one space), with each n-gram's word count and the
    key of its first n-1 words (0 for unigrams). The bytes are hashed as they are: no lowercasing or splitting."""
    n = len(ends)
    keys = np.empty(n, np.uint64)
    prefix = np.zeros(n, np.uint64)
    words = np.zeros(n, np.int64)
    start = 0
    for i in range(n):
        key = GOLDEN
        h = _FNV_OFFSET
        for j in range(start, ends[i]):
            b = buf[j]
            if b == 32:  # a space ends a word
                key = mix(key ^ mix(h))
                words[i] += 1
                h = _FNV_OFFSET
            else:
                h = (h ^ np.uint64(b)) * _FNV_PRIME
        prefix[i] = key if words[i] > 0 else np.uint64(0)
        keys[i] = mix(key ^ mix(h))
        words[i] += 1
        start = ends[i]
    return keys, words, prefix


@njit(nogil=True, cache=True)
def featurize_bytes(
    buf: np.ndarray,
    ends: np.ndarray,
    fold: np.ndarray,
    word_bits: np.ndarray,
    space_bits: np.ndarray,
    marks: bool,
    table_keys: np.ndarray,
    table_rows: np.ndarray,
    max_order: int,
    prefix_closed: bool,
    sub_min: int = 0,
    sub_max: int = 0,
    sub_buckets: int = 0,
    sub_base: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Row ids of every kept n-gram (n = 1..max_order) of each document and each document's start offset.

    `buf` holds the documents' UTF-8 bytes back to back, document i ending at `ends[i]`, lowercased already unless
    ASCII (`fold` lowercases ASCII letters). Word characters are told by `fold` for ASCII and by `word_bits` for the
    others. With `marks` (the `tokenize` rule `\\w+|[^\\w\\s]`), tokens are runs of word characters and each character
    that is neither a word character nor a space (`space_bits`) on its own; without (the legacy rule
    `\\b\\w\\w+\\b`), tokens are runs of at least two word characters and everything else separates them.

    Within a document the ids come order by order (all unigrams in text order, then all bigrams, ...). With a
    prefix-closed vocabulary an n-gram is tried only where its first n-1 words were found.

    With `sub_buckets` > 0, each token's character n-grams (n = sub_min..sub_max, of the token wrapped in `<` and `>`,
    as fastText's subwords) follow, token by token, length by length, left to right: row `sub_base` + the n-gram's
    hash modulo `sub_buckets` (see `subword_row`).
    """
    n_docs = len(ends)
    offsets = np.empty(n_docs, np.int64)
    mask = np.uint64(len(table_keys) - 1)
    longest, start = 0, 0
    for d in range(n_docs):
        longest = max(longest, ends[d] - start)
        start = ends[d]
    # Per document and start position: the word's key, the current n-gram's key, whether it is worth extending.
    # With marks every byte can be a token of its own.
    most = longest + 1 if marks else longest // 2 + 1
    shortest = 1 if marks else 2
    wkeys = np.empty(most, np.uint64)
    cur = np.empty(most, np.uint64)
    alive = np.empty(most, np.bool_)
    # Each token's first and end byte, and its folded bytes wrapped in `<` `>` with its character starts.
    wstart = np.empty(most, np.int64)
    wend = np.empty(most, np.int64)
    wrapped = np.empty(longest + 2, np.uint8)
    cstart = np.empty(longest + 3, np.int64)
    span = max(sub_max - sub_min + 1, 0)
    out = np.empty(max(1024, len(buf) // 2), np.int64)
    n_out = 0
    start = 0
    for d in range(n_docs):
        offsets[d] = n_out
        # Tokenise and hash the words (and marks), decoded from UTF-8.
        n_tok, length, h = 0, 0, _FNV_OFFSET
        i = start
        while i <= ends[d]:
            size, word, mark = 1, False, False
            if i < ends[d]:
                b = buf[i]
                if b < 0x80:
                    cp = np.int64(b)
                    word = fold[b] != 0
                else:
                    # A multi-byte character: its code point decides (the bytes are valid UTF-8, from str.encode).
                    size = 2 if b < 0xE0 else (3 if b < 0xF0 else 4)
                    cp = np.int64(b & (0x3F >> (size - 1)))
                    for k in range(1, size):
                        cp = (cp << 6) | (buf[i + k] & 0x3F)
                    word = (word_bits[cp >> 3] >> (cp & 7)) & 1 == 1
                mark = marks and not word and (space_bits[cp >> 3] >> (cp & 7)) & 1 == 0
            if word:
                if length == 0:
                    wstart[n_tok] = i
                for k in range(size):
                    h = (h ^ np.uint64(fold[buf[i]] if size == 1 else buf[i + k])) * _FNV_PRIME
                length += 1
            else:
                if length >= shortest:
                    wkeys[n_tok] = mix(h)
                    wend[n_tok] = i
                    n_tok += 1
                h, length = _FNV_OFFSET, 0
                if mark:  # a token of its own, hashed as it is (no ASCII mark has a case)
                    wstart[n_tok] = i
                    for k in range(size):
                        h = (h ^ np.uint64(buf[i + k])) * _FNV_PRIME
                    wkeys[n_tok] = mix(h)
                    wend[n_tok] = i + size
                    n_tok += 1
                    h = _FNV_OFFSET
            i += size
        start = ends[d]
        if n_out + n_tok * max_order > len(out):  # grow the output (amortised doubling)
            bigger = np.empty(max(2 * len(out), n_out + n_tok * max_order), np.int64)
            bigger[:n_out] = out[:n_out]
            out = bigger
        for j in range(n_tok):
            cur[j] = GOLDEN
            alive[j] = True
        # Order by order: the order the featuriser has always given, so that pooled sums stay bit-identical.
        for n in range(1, max_order + 1):
            found_any = False
            for j in range(n_tok - n + 1):
                if not alive[j]:
                    continue
                cur[j] = mix(cur[j] ^ wkeys[j + n - 1])
                row = _probe(cur[j], table_keys, table_rows, mask)
                if row >= 0:
                    out[n_out] = row
                    n_out += 1
                    found_any = True
                elif prefix_closed:
                    alive[j] = False
            if prefix_closed and not found_any:
                break
        if sub_buckets > 0:
            for j in range(n_tok):
                # The token's bytes (ASCII folded) between the markers, and where each character starts.
                nb, nc = 1, 1
                wrapped[0] = 60  # "<"
                cstart[0] = 0
                for k in range(wstart[j], wend[j]):
                    b = buf[k]
                    if b < 0x80 or b >= 0xC0:  # not a continuation byte: a character starts here
                        cstart[nc] = nb
                        nc += 1
                    wrapped[nb] = fold[b] if b < 0x80 and fold[b] != 0 else b  # marks keep their bytes
                    nb += 1
                wrapped[nb] = 62  # ">"
                cstart[nc] = nb
                nb += 1
                nc += 1
                cstart[nc] = nb
                if n_out + nc * span > len(out):
                    bigger = np.empty(max(2 * len(out), n_out + nc * span), np.int64)
                    bigger[:n_out] = out[:n_out]
                    out = bigger
                for n in range(sub_min, sub_max + 1):
                    for c in range(nc - n + 1):
                        h = _FNV_OFFSET
                        for k in range(cstart[c], cstart[c + n]):
                            h = (h ^ np.uint64(wrapped[k])) * _FNV_PRIME
                        out[n_out] = sub_base + np.int64(mix(h) % np.uint64(sub_buckets))
                        n_out += 1
    return out[:n_out].copy(), offsets
