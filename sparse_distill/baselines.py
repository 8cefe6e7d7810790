"""Baselines beside the DAN student: word-level neural students (MLP, BiLSTM, Kim CNN), TF-IDF + logistic regression,
and fastText.

The neural students read word ids from a `WordVocab` (the same tokenisation as the n-gram vocabulary: lowercase,
`vocab.TOKEN_PATTERN`), are trained with the same KL loss as the DAN (teacher soft labels or one-hot gold labels), and
are timed end to end from raw text through `WordStudentPredictor.predict_proba`.

Id 0 is padding and id 1 the unknown word. Every student masks padding with the true lengths, so a document's
logits do not depend on the other documents of its batch.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import joblib
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sparse_distill.config import TrainConfig
from sparse_distill.data import atomic_write, atomic_write_text, write_dir_atomically
from sparse_distill.training import MetricsCallback, TrainResult, fit, kl_loss
from sparse_distill.vocab import LEGACY_TOKEN_PATTERN, TOKEN_PATTERN, check_token_pattern, tokenize

logger = logging.getLogger(__name__)

PAD_ID = 0
UNK_ID = 1
WORD_VOCAB = "word_vocab.json"
WORD_STUDENT_WEIGHTS = "word_student.safetensors"
WORD_STUDENT_CONFIG = "word_student.json"
_VOCAB_FORMAT = "sparse-distill-word-vocab"

StudentKind = Literal["mlp", "bilstm", "cnn"]


# --------------------------------------------------------------------------------------------------------------------
# Word vocabulary
# --------------------------------------------------------------------------------------------------------------------


class WordVocab:
    """Words to ids: 0 = padding, 1 = unknown, then the kept words from the most frequent down; texts are cut into
    words by `token_pattern` (one of `vocab.TOKEN_PATTERNS`)."""

    def __init__(self, words: Sequence[str], token_pattern: str = TOKEN_PATTERN) -> None:
        self.words = list(words)
        self.token_pattern = check_token_pattern(token_pattern)
        self.index = {w: i + 2 for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("duplicate words in the vocabulary")

    def __len__(self) -> int:
        return len(self.words) + 2

    @classmethod
    def build(cls, texts: Iterable[str], size: int) -> WordVocab:
        """The top `size` words by count (ties alphabetically, so the result is the same on every machine).

        `size` counts words only: the vocabulary has `size + 2` ids with padding and unknown.
        """
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(tokenize(text))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
        logger.info("word vocabulary: %d of %d distinct words kept", len(ranked), len(counts))
        return cls([w for w, _ in ranked])

    def encode_ragged(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids of all texts back to back (int64) and each text's length (its first `max_len` words)."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        get = self.index.get
        tokens = [tokenize(t, self.token_pattern)[:max_len] for t in texts]
        lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        flat = np.fromiter((get(w, UNK_ID) for w in chain.from_iterable(tokens)), np.int64, int(lengths.sum()))
        return flat, lengths

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids [B, L] (L = the longest text in the batch, at least 1; 0 = padding) and lengths [B]."""
        flat, lengths = self.encode_ragged(texts, max_len)
        ids = _pad(flat, _offsets(lengths), lengths, np.arange(len(lengths)))
        return torch.from_numpy(ids), torch.from_numpy(lengths)

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON (atomically)."""
        blob = {
            "format": _VOCAB_FORMAT,
            "version": 1,
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
            "token_pattern": self.token_pattern,
            "words": self.words,
        }
        atomic_write_text(path, json.dumps(blob, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> WordVocab:
        blob = json.loads(Path(path).read_text())
        if blob.get("format") != _VOCAB_FORMAT:
            raise ValueError(f"{path}: not a word vocabulary")
        # Saved before the pattern was recorded: the legacy one, which those vocabularies were cut with.
        pattern = blob.get("token_pattern", LEGACY_TOKEN_PATTERN)
        return cls(blob["words"], check_token_pattern(pattern, f"{path}: token_pattern"))


def _pad(flat: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Gather the chosen rows of a ragged id array into a zero-padded [len(rows), L] int64 matrix, without a loop."""
    lens = lengths[rows]
    width = max(int(lens.max()) if len(lens) else 0, 1)
    cols = np.arange(width)
    mask = cols[None, :] < lens[:, None]
    # Clip positions past a row's end to a valid index; the mask zeroes them afterwards.
    src = np.minimum(offsets[rows][:, None] + cols[None, :], max(len(flat) - 1, 0))
    source = flat if len(flat) else np.zeros(1, np.int64)
    return np.where(mask, source[src], PAD_ID).astype(np.int64, copy=False)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """Start of each text in the ragged id array."""
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths


def _length_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] True where a position holds a word."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


# --------------------------------------------------------------------------------------------------------------------
# Word-level students
# --------------------------------------------------------------------------------------------------------------------


class _WordStudent(nn.Module):
    """Shared parts: the word embedding (row 0 = padding, kept at zero) and parameter counts."""

    embedding: nn.Embedding

    def __init__(self, vocab_size: int, num_classes: int, dim: int) -> None:
        super().__init__()
        self.vocab_size, self.num_classes, self.dim = vocab_size, num_classes, dim
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)

    def param_counts(self) -> dict[str, int]:
        """Total, sparse (embedding table) and dense parameter counts, as `DanStudent.param_counts`."""
        sparse = self.embedding.weight.numel()
        dense = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("embedding."))
        return {"total": sparse + dense, "sparse": sparse, "dense": dense}


class WordMlpStudent(_WordStudent):
    """Mean of the word embeddings (padding excluded), one hidden ReLU layer, the output layer."""

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 16, hidden: int = 64, dropout: float = 0.0):
        super().__init__(vocab_size, num_classes, dim)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = _length_mask(lengths, ids.shape[1]).unsqueeze(-1)
        summed = (self.embedding(ids) * mask).sum(1)
        # An empty text averages to the zero vector rather than dividing by zero.
        pooled = summed / lengths.clamp(min=1).unsqueeze(1).to(summed.dtype)
        return self.fc2(torch.relu(self.fc1(self.dropout(pooled))))


class BiLstmStudent(_WordStudent):
    """Embedding, a one-layer bidirectional LSTM over packed sequences, max-pool over time, a linear layer."""

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 100, hidden: int = 128, dropout: float = 0.0):
        super().__init__(vocab_size, num_classes, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden, num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Packing needs every length >= 1: an empty text is read as one padding step (a zero vector).
        lengths = lengths.clamp(min=1)
        width = ids.shape[1]
        # Packed sequences let the backward direction start at each text's last word, not at the batch's padding.
        packed = pack_padded_sequence(self.embedding(ids), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=width)
        # LSTM outputs can be negative, so padded steps must be -inf (not 0) to stay out of the max.
        out = out.masked_fill(~_length_mask(lengths, width).unsqueeze(-1), float("-inf"))
        return self.fc(self.dropout(out.max(1).values))


class CnnStudent(_WordStudent):
    """Kim (2014)'s CNN: one conv1d per filter width, ReLU, max-pool over time (masked), concatenation, linear."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        dim: int = 100,
        filters: int = 100,
        widths: Sequence[int] = (3, 4, 5),
        dropout: float = 0.0,
    ):
        super().__init__(vocab_size, num_classes, dim)
        self.widths = tuple(int(w) for w in widths)
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths must be positive, got {widths}")
        self.convs = nn.ModuleList(nn.Conv1d(dim, filters, w) for w in self.widths)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(filters * len(self.widths), num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Pad to the widest filter so every width has at least one window; padding embeds to zeros.
        width = max(ids.shape[1], max(self.widths))
        x = self.embedding(ids) * _length_mask(lengths, ids.shape[1]).unsqueeze(-1)
        x = F.pad(x, (0, 0, 0, width - ids.shape[1])).transpose(1, 2)  # [B, dim, width]
        pooled = []
        for w, conv in zip(self.widths, self.convs, strict=True):
            h = torch.relu(conv(x))  # [B, filters, width - w + 1]
            # Windows that start inside the text and fit in it; a text shorter than w keeps its one padded window,
            # which sees the same zeros whatever the batch's width, so the result does not depend on the batch.
            valid = (lengths - w + 1).clamp(min=1)
            # After ReLU every value is >= 0, so filling invalid windows with 0 cannot win the max over valid ones.
            h = h.masked_fill(~_length_mask(valid, h.shape[2]).unsqueeze(1), 0.0)
            pooled.append(h.max(2).values)
        return self.fc(self.dropout(torch.cat(pooled, 1)))


STUDENT_KINDS: dict[str, type[_WordStudent]] = {"mlp": WordMlpStudent, "bilstm": BiLstmStudent, "cnn": CnnStudent}


def make_word_student(kind: StudentKind, vocab_size: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """A fresh word-level student of the given kind; `kwargs` are its shape (dim, hidden, filters, widths, dropout)."""
    if kind not in STUDENT_KINDS:
        raise ValueError(f"unknown student kind {kind!r}; expected one of {sorted(STUDENT_KINDS)}")
    return STUDENT_KINDS[kind](vocab_size, num_classes, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def _logits_in_batches(
    model: nn.Module,
    flat: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Logits of pre-encoded texts, in batches (a BiLSTM over a whole dev set at once would need a lot of memory)."""
    model.eval()
    out = []
    for i in range(0, len(lengths), batch_size):
        rows = np.arange(i, min(i + batch_size, len(lengths)))
        ids = torch.from_numpy(_pad(flat, offsets, lengths, rows)).to(device)
        out.append(model(ids, torch.from_numpy(lengths[rows]).to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def train_word_student(
    model: nn.Module,
    vocab: WordVocab,
    train_texts: list[str],
    train_targets: np.ndarray,
    dev_texts: list[str],
    dev_labels: Sequence[int],
    config: TrainConfig,
    max_len: int = 256,
    on_metrics: MetricsCallback | None = None,
    metric_prefix: str = "",
    device: str | torch.device = "cpu",
) -> tuple[TrainResult, nn.Module]:
    """Train a word-level student with KL to the targets (teacher soft labels, or one-hot gold labels).

    Adam over all parameters; batches reshuffled each epoch (seeded by `config.seed`); dev accuracy every
    `config.eval_every` steps and at the end. Stops at `config.max_steps` (else `config.epochs`) or after
    `config.patience` evaluations without improvement. The best-dev weights are loaded back into the model, which is
    returned with the result. `config.temperature` softens the KL as in the DAN's distillation.
    """
    if not train_texts:
        raise ValueError("no training texts")
    targets = np.asarray(train_targets, np.float32)
    if targets.ndim != 2 or len(targets) != len(train_texts):
        raise ValueError(f"train_targets must be [{len(train_texts)}, num_classes], got {targets.shape}")
    device = torch.device(device)
    torch.manual_seed(config.seed)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    # Tokenise once: each step then only gathers and pads its rows' ids.
    flat, lengths = vocab.encode_ragged(train_texts, max_len)
    offsets = _offsets(lengths)
    num_docs = len(train_texts)
    dev_flat, dev_lengths = vocab.encode_ragged(dev_texts, max_len)
    dev_offsets, dev_y = _offsets(dev_lengths), np.asarray(dev_labels)

    best_state = copy.deepcopy(model.state_dict())

    def evaluate() -> float:
        logits = _logits_in_batches(model, dev_flat, dev_offsets, dev_lengths, 512, device)
        return float((logits.argmax(-1).numpy() == dev_y).mean()) if len(dev_y) else 0.0

    def save_best() -> None:
        # In memory: a baseline is small, and the caller decides whether to save it.
        nonlocal best_state
        best_state = copy.deepcopy(model.state_dict())

    def train_step(rows: np.ndarray) -> torch.Tensor:
        model.train()
        ids = torch.from_numpy(_pad(flat, offsets, lengths, rows)).to(device)
        logits = model(ids, torch.from_numpy(lengths[rows]).to(device))
        return kl_loss(logits, torch.from_numpy(targets[rows]).to(device), config.temperature)

    result = fit(
        [optimizer],
        train_step,
        evaluate,
        save_best,
        _RowBatches(num_docs, config.seed),
        config,
        on_metrics,
        metric_prefix,
        name=type(model).__name__,
    )
    model.load_state_dict(best_state)
    model.eval()
    return result, model


class _RowBatches:
    """Row positions of a pre-encoded train set, reshuffled each epoch (seeded as training.InMemoryBatches)."""

    def __init__(self, num_docs: int, seed: int) -> None:
        self.num_docs, self.seed = num_docs, seed

    def epoch(self, epoch: int, batch_size: int):
        order = np.random.default_rng(self.seed + epoch).permutation(self.num_docs)
        for i in range(0, self.num_docs, batch_size):
            yield order[i : i + batch_size]


# --------------------------------------------------------------------------------------------------------------------
# Inference, saving and loading
# --------------------------------------------------------------------------------------------------------------------


class WordStudentPredictor:
    """Raw text in, class probabilities out: tokenisation included, so timings are end to end."""

    def __init__(self, model: nn.Module, vocab: WordVocab, max_len: int = 256) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self.max_len = max_len

    @torch.inference_mode()
    def predict_proba(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """[N, num_classes] float32 probabilities."""
        device = next(self.model.parameters()).device
        out = [np.zeros((0, self.model.num_classes), np.float32)]
        for i in range(0, len(texts), batch_size):
            ids, lengths = self.vocab.encode(texts[i : i + batch_size], self.max_len)
            logits = self.model(ids.to(device), lengths.to(device))
            out.append(torch.softmax(logits.float(), -1).cpu().numpy())
        return np.concatenate(out)

    def predict(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Class indices."""
        return self.predict_proba(texts, batch_size).argmax(-1)


def save_word_student(
    model: nn.Module,
    vocab: WordVocab,
    kind: StudentKind,
    kwargs: dict[str, Any],
    out_dir: str | Path,
    max_len: int = 256,
) -> Path:
    """Write a model folder: weights (safetensors), kind + shape + max_len (JSON) and the vocabulary (JSON)."""
    if kind not in STUDENT_KINDS or not isinstance(model, STUDENT_KINDS[kind]):
        raise ValueError(f"a {type(model).__name__} is not a {kind!r} student")
    config = {
        "kind": kind,
        "vocab_size": model.vocab_size,
        "num_classes": model.num_classes,
        "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        "max_len": max_len,
    }

    def write(tmp: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WORD_STUDENT_WEIGHTS))
        atomic_write_text(tmp / WORD_STUDENT_CONFIG, json.dumps(config, indent=2))
        vocab.save(tmp / WORD_VOCAB)

    return write_dir_atomically(out_dir, write)


def load_word_student(out_dir: str | Path) -> WordStudentPredictor:
    """Load a folder written by `save_word_student`; the predictor holds `.model`, `.vocab` and `.max_len`."""
    out_dir = Path(out_dir)
    if not (out_dir / WORD_STUDENT_WEIGHTS).exists():
        raise FileNotFoundError(f"{out_dir}: not a word student folder (no {WORD_STUDENT_WEIGHTS})")
    config = json.loads((out_dir / WORD_STUDENT_CONFIG).read_text())
    model = make_word_student(config["kind"], config["vocab_size"], config["num_classes"], **config["kwargs"])
    model.load_state_dict(load_file(str(out_dir / WORD_STUDENT_WEIGHTS)))
    return WordStudentPredictor(model, WordVocab.load(out_dir / WORD_VOCAB), config["max_len"])


# --------------------------------------------------------------------------------------------------------------------
# TF-IDF + logistic regression
# --------------------------------------------------------------------------------------------------------------------


class TfidfLogReg:
    """TF-IDF n-grams (our tokenisation) into a logistic regression: the classic linear baseline."""

    def __init__(
        self,
        ngram_range: tuple[int, int] = (1, 2),
        min_df: int | float = 2,
        C: float = 1.0,
        max_iter: int = 1000,
    ) -> None:
        self.pipeline = Pipeline(
            [
                (
                    "tfidf",
                    TfidfVectorizer(
                        lowercase=True,
                        token_pattern=TOKEN_PATTERN,
                        ngram_range=tuple(ngram_range),
                        min_df=min_df,
                        sublinear_tf=True,
                    ),
                ),
                ("lr", LogisticRegression(C=C, max_iter=max_iter)),
            ]
        )
        self.num_classes: int | None = None

    def fit(
        self,
        texts: list[str],
        labels: Sequence[int],
        sample_weight: np.ndarray | None = None,
        num_classes: int | None = None,
    ) -> TfidfLogReg:
        """Fit on gold class indices (optionally weighted); `num_classes` defaults to max(label) + 1."""
        y = np.asarray(labels, np.int64)
        self.num_classes = num_classes or int(y.max()) + 1
        params = {} if sample_weight is None else {"lr__sample_weight": np.asarray(sample_weight, np.float64)}
        self.pipeline.fit(texts, y, **params)
        logger.info("tf-idf + LR: %d docs, %d features", len(texts), len(self.pipeline["tfidf"].vocabulary_))
        return self

    def fit_soft(self, texts: list[str], soft_targets: np.ndarray) -> TfidfLogReg:
        """Distil soft labels into the LR: cross-entropy to the teacher's distribution.

        scikit-learn's LogisticRegression takes hard labels only, but sum_c p_c * -log q_c is its weighted log-loss
        over C copies of each document, copy c labelled c with weight p_c. The TF-IDF is fitted on the documents
        once; the copies share its rows. Weights sum to one per document, so C keeps the meaning it has in `fit`.
        """
        probs = np.asarray(soft_targets, np.float64)
        if probs.ndim != 2 or len(probs) != len(texts):
            raise ValueError(f"soft_targets must have shape ({len(texts)}, num_classes); got {probs.shape}")
        n, c = probs.shape
        features = self.pipeline["tfidf"].fit_transform(texts)
        keep = probs.reshape(-1) > 0
        rows = np.repeat(np.arange(n), c)[keep]
        labels = np.tile(np.arange(c), n)[keep]
        self.num_classes = c
        self.pipeline["lr"].fit(features[rows], labels, sample_weight=probs.reshape(-1)[keep])
        logger.info("tf-idf + LR (soft): %d docs, %d features", n, len(self.pipeline["tfidf"].vocabulary_))
        return self

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """[N, num_classes] float32 probabilities; a class absent from training gets probability 0."""
        if self.num_classes is None:
            raise RuntimeError("fit the model first")
        proba = self.pipeline.predict_proba(texts)
        out = np.zeros((len(texts), self.num_classes), np.float32)
        out[:, self.pipeline["lr"].classes_] = proba
        return out

    def predict(self, texts: list[str]) -> np.ndarray:
        return self.predict_proba(texts).argmax(-1)

    def param_count(self) -> int:
        """Coefficients plus intercepts of the LR (the TF-IDF vocabulary and idf weights are not counted)."""
        lr = self.pipeline["lr"]
        return int(lr.coef_.size + lr.intercept_.size)

    def save(self, path: str | Path) -> None:
        """Pickle with joblib through the atomic writer (readers never see half a file)."""
        atomic_write(path, lambda tmp: joblib.dump(self, tmp))

    @staticmethod
    def load(path: str | Path) -> TfidfLogReg:
        model = joblib.load(path)
        if not isinstance(model, TfidfLogReg):
            raise TypeError(f"{path}: holds a {type(model).__name__}, not a TfidfLogReg")
        return model


# --------------------------------------------------------------------------------------------------------------------
# fastText: the tool a user would pick instead of a distilled student
# --------------------------------------------------------------------------------------------------------------------

# The quality benchmark's fixed settings (README, "Quality against fastText"): word bigrams, 25 passes, lr 0.5.
FASTTEXT_SETTINGS: dict[str, Any] = {"wordNgrams": 2, "epoch": 25, "lr": 0.5}
_SPACE = re.compile(r"\s+")


def fasttext_line(text: str) -> str:
    """A text as fastText reads it: lowercase, one line of space-separated tokens."""
    return _SPACE.sub(" ", text.lower()).strip()


def write_fasttext_file(path: str | Path, texts: Sequence[str], labels: Sequence[object], seed: int = 13) -> None:
    """fastText's training file: one `__label__L text` line per row (spaces in a label become `_`), in a seeded random
    order. fastText reads its file in order and never shuffles it; with its rate decaying to 0, a file sorted by label
    (IMDB's train split is) ends every pass on one class: on full IMDB one thread scored 0.510 in the file's order and
    0.889 shuffled (README, "Quality against fastText")."""
    if len(texts) != len(labels):
        raise ValueError(f"{path}: {len(texts)} texts but {len(labels)} labels")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    with Path(path).open("w", encoding="utf-8") as f:
        for i in order:
            f.write(f"__label__{str(labels[i]).replace(' ', '_')} {fasttext_line(texts[i])}\n")


class FastTextBaseline:
    """fastText's supervised classifier trained on the same gold rows as the students, predicting class probabilities
    like them (class indices are the run's `LabelMap` indices)."""

    def __init__(self, model: Any, num_classes: int) -> None:
        self.model = model
        self.num_classes = num_classes

    @classmethod
    def train(
        cls, texts: Sequence[str], labels: Sequence[int], num_classes: int, seed: int = 13, **settings: Any
    ) -> FastTextBaseline:
        """Train on gold class indices with `FASTTEXT_SETTINGS` (overridden by `settings`), the rows in an order
        shuffled with `seed` (`write_fasttext_file`). One thread: fastText's threads update the weights without locks,
        so with more the same run gives another model each time."""
        import fasttext  # the `fasttext-wheel` binding, a dependency; imported here so the library loads without it

        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "train.txt"
            write_fasttext_file(path, texts, [int(label) for label in labels], seed)
            model = fasttext.train_supervised(
                str(path), **{**FASTTEXT_SETTINGS, **settings, "thread": 1, "seed": seed, "verbose": 0}
            )
        logger.info("fastText: %d docs, %d words", len(texts), len(model.get_words()))
        return cls(model, num_classes)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities, shape (len(texts), num_classes)."""
        probs = np.zeros((len(texts), self.num_classes), np.float32)
        for row, text in enumerate(texts):
            # The binding's C++ call, one text at a time: its list form returns wrong probabilities with NumPy 2
            # (every class gets the top one's) and its one-string form fails there (np.array(copy=False)).
            for prob, label in self.model.f.predict(fasttext_line(text) + "\n", -1, 0.0, "strict"):
                probs[row, int(label.removeprefix("__label__"))] = prob
        return probs
