"""Training the student: distillation from soft labels (KL), fine-tuning and the from-scratch baseline.

One loop serves all three: targets are class distributions (the teacher's, or one-hot gold labels, for which the KL
equals the cross-entropy). SparseAdam updates only the embedding rows a batch touches; Adam updates the dense layers.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from sparse_distill.config import TrainConfig
from sparse_distill.soft_labels import iter_soft_labels, read_manifest
from sparse_distill.student import DanStudent
from sparse_distill.vocab import NgramVocab

logger = logging.getLogger(__name__)

Batch = tuple[list[str], np.ndarray]
MetricsCallback = Callable[[int, dict[str, float]], None]


def kl_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) at a temperature, scaled by T^2 so gradients keep their size as T changes."""
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    if temperature != 1.0:
        # Soften the teacher the same way: its probabilities are exp(logit), so p^(1/T) renormalised.
        teacher_probs = F.softmax(torch.log(teacher_probs.clamp_min(1e-12)) / temperature, dim=-1)
    return F.kl_div(log_p, teacher_probs, reduction="batchmean") * temperature**2


def make_optimizers(model: DanStudent, lr: float) -> list[torch.optim.Optimizer]:
    """SparseAdam for the embedding table, Adam for the dense layers (the paper's set-up)."""
    if model.config.table_dtype != "float32":
        raise ValueError(f"a {model.config.table_dtype} table is for inference only: train the float32 student")
    return [
        torch.optim.SparseAdam([model.embedding.weight], lr=lr),
        torch.optim.Adam(model.dense_parameters(), lr=lr),
    ]


class BatchSource(Protocol):
    """Training data: how many documents, and the batches of one epoch."""

    num_docs: int

    def epoch(self, epoch: int, batch_size: int) -> Iterator[Batch]: ...


@dataclass
class InMemoryBatches:
    """Texts with target distributions held in memory (the train set): shuffled each epoch."""

    texts: list[str]
    targets: np.ndarray
    seed: int = 13

    @property
    def num_docs(self) -> int:
        return len(self.texts)

    @classmethod
    def from_labels(cls, texts: list[str], labels: list[int], num_classes: int, seed: int = 13) -> InMemoryBatches:
        """One-hot targets from gold class indices."""
        targets = np.zeros((len(labels), num_classes), np.float32)
        targets[np.arange(len(labels)), labels] = 1.0
        return cls(texts, targets, seed)

    def epoch(self, epoch: int, batch_size: int) -> Iterator[Batch]:
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.texts))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield [self.texts[j] for j in idx], self.targets[idx]


@dataclass
class SoftLabelStream:
    """Soft labels streamed from labelling output folders: shards in a random order, a bounded shuffle buffer.

    Memory is bounded by `buffer_size` documents, not by corpus size.
    """

    label_dirs: list[str]
    buffer_size: int = 100_000
    seed: int = 13
    num_docs: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_docs = sum(read_manifest(d).total_rows for d in self.label_dirs)

    def epoch(self, epoch: int, batch_size: int) -> Iterator[Batch]:
        rng = random.Random(self.seed + epoch)
        manifests = {d: read_manifest(d) for d in self.label_dirs}
        shards = [(d, i) for d, m in manifests.items() for i in range(len(m.shards))]
        rng.shuffle(shards)
        buf_texts: list[str] = []
        buf_probs: list[np.ndarray] = []
        for d, i in shards:
            for texts, probs in iter_soft_labels(d, [i], manifests[d]):
                buf_texts.extend(texts)
                buf_probs.extend(probs)
            if len(buf_texts) >= self.buffer_size:
                yield from self._drain(buf_texts, buf_probs, batch_size, rng, keep=self.buffer_size // 2)
        yield from self._drain(buf_texts, buf_probs, batch_size, rng, keep=0)

    @staticmethod
    def _drain(
        texts: list[str], probs: list[np.ndarray], batch_size: int, rng: random.Random, keep: int
    ) -> Iterator[Batch]:
        # Shuffle the buffer, emit full batches until only `keep` documents remain (the rest mix with the next shard).
        order = list(range(len(texts)))
        rng.shuffle(order)
        texts[:] = [texts[i] for i in order]
        probs[:] = [probs[i] for i in order]
        while len(texts) - keep >= batch_size or (keep == 0 and texts):
            bt, bp = texts[:batch_size], probs[:batch_size]
            del texts[:batch_size], probs[:batch_size]
            yield bt, np.stack(bp)


@dataclass
class TrainResult:
    """Outcome of a training stage."""

    best_dev_accuracy: float
    best_step: int
    steps: int
    seconds: float
    history: list[dict[str, float]]


def to_tensors(vocab: NgramVocab, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Featurise texts into EmbeddingBag inputs."""
    ids, offsets = vocab.featurize(texts)
    return torch.from_numpy(ids), torch.from_numpy(offsets)


@torch.inference_mode()
def accuracy(model: DanStudent, ids: torch.Tensor, offsets: torch.Tensor, labels: np.ndarray) -> float:
    """Share of documents whose argmax equals the gold class index."""
    model.eval()
    pred = model(ids, offsets).argmax(-1).numpy()
    return float((pred == labels).mean()) if len(labels) else 0.0


def train_student(
    model: DanStudent,
    vocab: NgramVocab,
    data: BatchSource,
    dev_texts: list[str],
    dev_labels: list[int],
    config: TrainConfig,
    save_best: Callable[[DanStudent], None],
    on_metrics: MetricsCallback | None = None,
    metric_prefix: str = "",
    temperature: float = 1.0,
) -> TrainResult:
    """Train with KL to the targets; evaluate on dev every `eval_every` steps and save the best model."""
    torch.manual_seed(config.seed)
    optimizers = make_optimizers(model, config.lr)
    dev_ids, dev_offsets = to_tensors(vocab, dev_texts)
    dev_y = np.asarray(dev_labels)
    total = config.max_steps or max(1, math.ceil(config.epochs * data.num_docs / config.batch_size))
    best_acc, best_step, step, epoch, stale = -1.0, 0, 0, 0, 0
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    logger.info("%straining: %d docs, %d steps of %d", metric_prefix, data.num_docs, total, config.batch_size)

    def evaluate() -> bool:
        nonlocal best_acc, best_step, stale
        acc = accuracy(model, dev_ids, dev_offsets, dev_y)
        history.append({"step": step, "dev_accuracy": acc})
        if on_metrics:
            on_metrics(step, {f"{metric_prefix}dev_accuracy": acc})
        logger.info("%sstep %d/%d: dev accuracy %.4f", metric_prefix, step, total, acc)
        if acc > best_acc:
            best_acc, best_step, stale = acc, step, 0
            save_best(model)
            return False
        stale += 1
        return config.patience is not None and stale >= config.patience

    stop = False
    while step < total and not stop:
        for texts, targets in data.epoch(epoch, config.batch_size):
            model.train()
            ids, offsets = to_tensors(vocab, texts)
            loss = kl_loss(model(ids, offsets), torch.from_numpy(np.asarray(targets, np.float32)), temperature)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            step += 1
            if on_metrics and (step % 10 == 0 or step == 1):
                on_metrics(step, {f"{metric_prefix}train_loss": loss.item()})
            if step % config.eval_every == 0 or step == total:
                stop = evaluate()
            if step >= total or stop:
                break
        epoch += 1
    if not history or history[-1]["step"] != step:
        evaluate()
    return TrainResult(best_acc, best_step, step, time.perf_counter() - start, history)


def student_from_config(vocab_size: int, num_classes: int, student_cfg) -> DanStudent:
    """A fresh DAN from the student section of the config."""
    from sparse_distill.student import DanConfig

    return DanStudent(
        DanConfig(
            vocab_size=vocab_size,
            num_classes=num_classes,
            dim=student_cfg.dim,
            hidden=student_cfg.hidden,
            pooling=student_cfg.pooling,
            layers=student_cfg.layers,
            dropout=student_cfg.dropout,
            init_std=student_cfg.init_std,
        )
    )
