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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from sparse_distill.config import StudentConfig, TrainConfig
from sparse_distill.data import LabelMap
from sparse_distill.soft_labels import iter_soft_labels, read_manifest
from sparse_distill.student import DanConfig, DanStudent, load_student, save_student
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


def make_optimizers(model: DanStudent, lr: float, table_lr: float | None = None) -> list[torch.optim.Optimizer]:
    """SparseAdam for the embedding table (at `table_lr`, default `lr`), Adam for the dense layers (the paper's
    set-up)."""
    if model.config.table_dtype != "float32":
        raise ValueError(f"a {model.config.table_dtype} table is for inference only: train the float32 student")
    return [
        torch.optim.SparseAdam([model.embedding.weight], lr=table_lr or lr),
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
    budget: dict[str, Any] = field(default_factory=dict)


# The automatic budget: about this many documents seen in all, but at least MIN and at most MAX passes over the data.
# Early stopping on dev usually ends the run sooner; the budget is the ceiling that the learning-rate decay spans.
AUTO_DOCS_SEEN = 1_500_000
AUTO_MIN_EPOCHS = 2.0
AUTO_MAX_EPOCHS = 60.0
# Evaluate about this many times over the budget (never less often than once per pass over small data).
AUTO_EVALS = 40


@dataclass(frozen=True)
class Budget:
    """How long a stage trains and how often it looks at dev, and why."""

    steps: int
    eval_every: int
    epochs: float
    reason: str


def plan_budget(num_docs: int, config: TrainConfig) -> Budget:
    """The step budget: `max_steps`, else `epochs`, else derived from the data size (see AUTO_DOCS_SEEN)."""
    per_epoch = max(1, math.ceil(num_docs / config.batch_size))
    if config.max_steps:
        steps, reason = config.max_steps, "max_steps set"
    elif config.epochs:
        steps, reason = max(1, math.ceil(config.epochs * num_docs / config.batch_size)), "epochs set"
    else:
        epochs = min(AUTO_MAX_EPOCHS, max(AUTO_MIN_EPOCHS, AUTO_DOCS_SEEN / max(num_docs, 1)))
        steps = max(1, math.ceil(epochs * num_docs / config.batch_size))
        reason = (
            f"auto: {epochs:.1f} passes over {num_docs:,} docs ({AUTO_DOCS_SEEN:,} docs seen, within "
            f"{AUTO_MIN_EPOCHS:g}-{AUTO_MAX_EPOCHS:g} passes; early stopping may end it sooner)"
        )
    eval_every = config.eval_every or max(1, min(per_epoch, math.ceil(steps / AUTO_EVALS)))
    return Budget(steps, eval_every, steps * config.batch_size / max(num_docs, 1), reason)


def lr_scale(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the base learning rate at `step` (0-based): linear warm-up, then constant or a decay to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit(
    optimizers: list[torch.optim.Optimizer],
    train_step: Callable[[Any], torch.Tensor],
    evaluate: Callable[[], float],
    save_best: Callable[[], None],
    data: BatchSource,
    config: TrainConfig,
    on_metrics: MetricsCallback | None = None,
    metric_prefix: str = "",
    name: str = "student",
    evaluate_first: bool = False,
) -> TrainResult:
    """The one training loop of every student: steps over shuffled epochs, a learning-rate schedule, dev evaluation
    every `eval_every` steps, the best dev checkpoint kept (`save_best`), early stopping after `patience` evaluations
    without improvement.

    `train_step` returns the loss of one batch (the loop runs backward and the optimizer steps); `evaluate` returns
    the dev accuracy. `evaluate_first` scores the model before any step (fine-tuning: the starting model stays the
    best checkpoint unless training beats it on dev).
    """
    if data.num_docs < 1:
        raise ValueError(f"{name}: no training documents")
    budget = plan_budget(data.num_docs, config)
    total = budget.steps
    warmup = math.ceil(config.warmup_ratio * total)
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    best_acc, best_step, step, epoch, stale = -1.0, 0, 0, 0, 0
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    logger.info(
        "%s%s: %d docs, %d steps of %d, dev every %d (%s)",
        metric_prefix,
        name,
        data.num_docs,
        total,
        config.batch_size,
        budget.eval_every,
        budget.reason,
    )

    def check() -> bool:
        nonlocal best_acc, best_step, stale
        acc = evaluate()
        history.append({"step": step, "dev_accuracy": acc})
        if on_metrics:
            on_metrics(step, {f"{metric_prefix}dev_accuracy": acc})
        logger.info("%s%s step %d/%d: dev accuracy %.4f", metric_prefix, name, step, total, acc)
        if acc > best_acc:
            best_acc, best_step, stale = acc, step, 0
            save_best()
            return False
        stale += 1
        return config.patience is not None and stale >= config.patience

    stop = check() if evaluate_first else False
    while step < total and not stop:
        for batch in data.epoch(epoch, config.batch_size):
            scale = lr_scale(step, total, config.schedule, warmup)
            for opt, lrs in zip(optimizers, base_lrs, strict=True):
                for group, lr in zip(opt.param_groups, lrs, strict=True):
                    group["lr"] = lr * scale
            loss = train_step(batch)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            step += 1
            if on_metrics and (step % 10 == 0 or step == 1):
                on_metrics(step, {f"{metric_prefix}train_loss": loss.item()})
            if step % budget.eval_every == 0 or step == total:
                stop = check()
            if step >= total or stop:
                break
        epoch += 1
    if not history or history[-1]["step"] != step:
        check()
    seconds = time.perf_counter() - start
    logger.info(
        "%s%s: best dev accuracy %.4f at step %d of %d%s (%.1f s)",
        metric_prefix,
        name,
        best_acc,
        best_step,
        step,
        " (early stop)" if stop else "",
        seconds,
    )
    plan = {**asdict(budget), "early_stopped": stop}
    return TrainResult(best_acc, best_step, step, seconds, history, plan)


def drop_ngrams(
    ids: np.ndarray, offsets: np.ndarray, rate: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Drop each n-gram occurrence of a batch of bags with probability `rate`, keeping at least one per non-empty bag.

    The DAN's word dropout (Iyyer et al. 2015) at the n-gram level: a train document's rare n-grams are often unique to
    it, and a student that leans on them fits the train set but meets far fewer known n-grams at test time.
    """
    keep = rng.random(len(ids)) >= rate
    sizes = np.diff(np.append(offsets, len(ids)))
    bag = np.repeat(np.arange(len(offsets)), sizes)
    kept = np.bincount(bag[keep], minlength=len(offsets))
    # A bag that lost everything keeps its first n-gram.
    lost = np.flatnonzero((kept == 0) & (sizes > 0))
    keep[offsets[lost]] = True
    kept[lost] = 1
    new_offsets = np.zeros(len(offsets), dtype=offsets.dtype)
    np.cumsum(kept[:-1], out=new_offsets[1:])
    return ids[keep], new_offsets


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
    evaluate_first: bool = False,
) -> TrainResult:
    """Train a DAN with KL to the batches' targets (see `fit`); the best dev model goes to `save_best`."""
    torch.manual_seed(config.seed)
    optimizers = make_optimizers(model, config.lr, config.table_lr)
    dev_ids, dev_offsets = to_tensors(vocab, dev_texts)
    dev_y = np.asarray(dev_labels)

    rng = np.random.default_rng(config.seed)

    def train_step(batch: Batch) -> torch.Tensor:
        texts, targets = batch
        model.train()
        ids, offsets = vocab.featurize(texts)
        if config.ngram_dropout:
            ids, offsets = drop_ngrams(ids, offsets, config.ngram_dropout, rng)
        ids, offsets = torch.from_numpy(ids), torch.from_numpy(offsets)
        return kl_loss(model(ids, offsets), torch.from_numpy(np.asarray(targets, np.float32)), temperature)

    return fit(
        optimizers,
        train_step,
        lambda: accuracy(model, dev_ids, dev_offsets, dev_y),
        lambda: save_best(model),
        data,
        config,
        on_metrics,
        metric_prefix,
        name="DAN",
        evaluate_first=evaluate_first,
    )


def train_dan(
    out_dir: str | Path,
    vocab_dir: str | Path,
    data: BatchSource,
    dev_texts: list[str],
    dev_labels: list[int],
    label_map: LabelMap,
    student: StudentConfig,
    config: TrainConfig,
    init_model: str | Path | None = None,
    init: Callable[[DanStudent], None] | None = None,
    on_metrics: MetricsCallback | None = None,
    metric_prefix: str = "",
) -> dict[str, Any]:
    """Train a DAN into `out_dir/model` (the best dev checkpoint) and return its record.

    The model starts from `init_model` (a student folder: KD+FT), else fresh from `student` (then `init` may set
    its table, e.g. from the teacher's vectors). The pipeline's stages and the experiments all train through here.
    """
    vocab = NgramVocab.load(vocab_dir)
    if init_model:
        model, _ = load_student(init_model, mmap=False)
    else:
        torch.manual_seed(config.seed)
        model = student_from_config(len(vocab), label_map.num_classes, student)
        if init is not None:
            init(model)
    model_dir = Path(out_dir) / "model"
    res = train_student(
        model,
        vocab,
        data,
        dev_texts,
        dev_labels,
        config,
        save_best=lambda m: save_student(m, label_map, vocab_dir, model_dir),
        on_metrics=on_metrics,
        metric_prefix=metric_prefix,
        temperature=config.temperature,
        evaluate_first=init_model is not None,
    )
    return {
        "model_dir": str(model_dir),
        "dev_accuracy": res.best_dev_accuracy,
        "best_step": res.best_step,
        "steps": res.steps,
        "seconds": res.seconds,
        "params": model.param_counts(),
        "budget": res.budget,
    }


def student_from_config(vocab_size: int, num_classes: int, student_cfg: StudentConfig) -> DanStudent:
    """A fresh DAN from the student section of the config."""
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
