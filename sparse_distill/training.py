"""Training the student: distillation from soft labels (KL), fine-tuning and the from-scratch baseline.

One loop serves all three: targets are class distributions (the teacher's, or one-hot gold labels, for which the KL
equals the cross-entropy). The table's optimizer (SparseAdam, or a row-wise one from `sparse_optim`) updates only the
embedding rows a batch touches; Adam updates the dense layers. The loop can write resumable checkpoints
(`Checkpointing`) and the DAN trains on a CPU or a CUDA GPU (`resolve_device`).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import queue
import random
import shutil
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from sparse_distill.config import DistillLoss, StudentConfig, TrainConfig, fingerprint
from sparse_distill.data import LabelMap, atomic_write, atomic_write_text, remove_temporaries
from sparse_distill.features import iter_featurized
from sparse_distill.run_store import file_fingerprint
from sparse_distill.soft_labels import iter_soft_labels, read_manifest
from sparse_distill.sparse_optim import table_optimizer
from sparse_distill.student import (
    STUDENT_WEIGHTS,
    DanConfig,
    DanStudent,
    load_student,
    merge_members,
    save_student,
    split_member,
)
from sparse_distill.vocab import NgramVocab

if TYPE_CHECKING:
    from sparse_distill.table_kernels import BagPlan

logger = logging.getLogger(__name__)


@dataclass
class DocIds:
    """Documents already featurised (see `sparse_distill.features`): flat n-gram ids and each document's start."""

    ids: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets)

    @classmethod
    def join(cls, docs: list[np.ndarray]) -> DocIds:
        """One batch from per-document id arrays."""
        lengths = np.fromiter(map(len, docs), np.int64, len(docs))
        offsets = np.zeros(len(docs), np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        return cls(np.concatenate(docs) if docs else np.zeros(0, np.int64), offsets)

    def split(self) -> list[np.ndarray]:
        """Per-document views of the ids."""
        return np.split(self.ids, self.offsets[1:]) if len(self.offsets) else []


# A batch: texts (or the same documents featurised once) and their target distributions.
Batch = tuple[list[str] | DocIds, np.ndarray]
MetricsCallback = Callable[[int, dict[str, float]], None]


def logit_mse_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's logits and the log of the target distribution, both centred per
    row (logits are defined up to a constant). Unlike KL it keeps pulling on texts both already give one class with
    near certainty, so the student learns how sure the teacher is, not only which class it prefers. Probabilities
    under 1e-6 count as 1e-6, so no margin counts beyond about 14 (and gold one-hot targets stay finite)."""
    target = torch.log(teacher_probs.clamp_min(1e-6))
    target = target - target.mean(dim=-1, keepdim=True)
    return F.mse_loss(student_logits - student_logits.mean(dim=-1, keepdim=True), target)


def kl_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) at a temperature, scaled by T^2 so gradients keep their size as T changes."""
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    if temperature != 1.0:
        # Soften the teacher the same way: its probabilities are exp(logit), so p^(1/T) renormalised.
        teacher_probs = F.softmax(torch.log(teacher_probs.clamp_min(1e-12)) / temperature, dim=-1)
    return F.kl_div(log_p, teacher_probs, reduction="batchmean") * temperature**2


def make_optimizers(
    model: DanStudent, lr: float, table_lr: float | None = None, table: str = "sparse_adam"
) -> list[torch.optim.Optimizer]:
    """The table's optimizer (`table`: SparseAdam by default, see `sparse_optim.TABLE_OPTIMIZERS`) at `table_lr`
    (default `lr`), and Adam for the dense layers (the paper's set-up)."""
    if model.config.table_dtype != "float32":
        raise ValueError(f"a {model.config.table_dtype} table is for inference only: train the float32 student")
    return [
        table_optimizer(table, model.embedding.weight, table_lr or lr),
        torch.optim.Adam(model.dense_parameters(), lr=lr),
    ]


# torch's default generator is one per process. The pipeline flow trains the baseline beside KD in one process, and
# a stage seeding it while the other draws its initial weights would make those weights depend on thread timing (seen:
# students a few dev texts apart from the same stage run alone). Seeding and the draws that follow it hold this lock.
SEEDED_DRAWS = threading.Lock()


def resolve_device(spec: str) -> torch.device:
    """The torch device of a `device` setting: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda[:N].

    A GPU asked for where there is none is an error naming the setting, not a silent CPU run.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        setting = f"device={spec!r} (the training section's setting: distill.device, finetune.device or scratch.device)"
        if count == 0:
            raise ValueError(f"{setting}: torch finds no CUDA GPU on this machine; set it to auto or cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{setting}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


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
    # The texts featurised once (`featurized`): epochs then yield DocIds batches instead of texts.
    docs: list[np.ndarray] | None = None

    @property
    def num_docs(self) -> int:
        return len(self.texts)

    def featurized(self, vocab: NgramVocab) -> InMemoryBatches:
        """The same batches with every text featurised once, up front, instead of in every epoch."""
        ids, offsets = vocab.featurize(self.texts, engine="compiled")
        return InMemoryBatches(self.texts, self.targets, self.seed, DocIds(ids, offsets).split())

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
            if self.docs is not None:
                yield DocIds.join([self.docs[j] for j in idx]), self.targets[idx]
            else:
                yield [self.texts[j] for j in idx], self.targets[idx]


@dataclass
class SoftLabelStream:
    """Soft labels streamed from labelling output folders: shards in a random order, a bounded shuffle buffer.

    Memory is bounded by `buffer_size` documents, not by corpus size. With `feature_dirs` (one per label folder, made
    by `features.featurize_labels`), documents come as their stored n-gram ids (DocIds batches), not as texts.
    """

    label_dirs: list[str]
    buffer_size: int = 100_000
    seed: int = 13
    feature_dirs: list[str] | None = None
    # Gold target distributions of a label folder's source rows (in file order), keyed by folder: its documents'
    # targets become `(1 - gold_weight) * teacher + gold_weight * gold` (rows of zeros: the teacher's alone).
    gold: dict[str, np.ndarray] = field(default_factory=dict)
    gold_weight: float = 0.0
    num_docs: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_docs = sum(read_manifest(d).total_rows for d in self.label_dirs)

    def epoch(self, epoch: int, batch_size: int) -> Iterator[Batch]:
        rng = random.Random(self.seed + epoch)
        manifests = {d: read_manifest(d) for d in self.label_dirs}
        shards = [(d, i) for d, m in manifests.items() for i in range(len(m.shards))]
        rng.shuffle(shards)
        if self.feature_dirs is not None and len(self.feature_dirs) != len(self.label_dirs):
            raise ValueError(f"{len(self.feature_dirs)} feature folders for {len(self.label_dirs)} label folders")
        features = dict(zip(self.label_dirs, self.feature_dirs or [], strict=False))
        buf_docs: list = []  # texts, or per-document id arrays
        buf_probs: list[np.ndarray] = []
        for d, i in shards:
            before = len(buf_probs)
            if d in features:
                for ids, offsets, probs in iter_featurized(d, features[d], [i], manifests[d]):
                    buf_docs.extend(DocIds(ids, offsets).split())
                    buf_probs.extend(probs)
            else:
                for texts, probs in iter_soft_labels(d, [i], manifests[d]):
                    buf_docs.extend(texts)
                    buf_probs.extend(probs)
            if d in self.gold and self.gold_weight > 0:
                shard = manifests[d].shards[i]
                gold = self.gold[d][shard.start : shard.stop]
                # A row of zeros: no gold label for that document, its target stays the teacher's.
                weight = self.gold_weight * (gold.sum(axis=1, keepdims=True) > 0)
                mixed = (1 - weight) * np.stack(buf_probs[before:]) + weight * gold
                buf_probs[before:] = list(mixed.astype(np.float32))
            if len(buf_docs) >= self.buffer_size:
                yield from self._drain(buf_docs, buf_probs, batch_size, rng, keep=self.buffer_size // 2)
        yield from self._drain(buf_docs, buf_probs, batch_size, rng, keep=0)

    @staticmethod
    def _drain(docs: list, probs: list[np.ndarray], batch_size: int, rng: random.Random, keep: int) -> Iterator[Batch]:
        # Shuffle the buffer, emit full batches until only `keep` documents remain (the rest mix with the next shard).
        order = list(range(len(docs)))
        rng.shuffle(order)
        docs[:] = [docs[i] for i in order]
        probs[:] = [probs[i] for i in order]
        while len(docs) - keep >= batch_size or (keep == 0 and docs):
            bt, bp = docs[:batch_size], probs[:batch_size]
            del docs[:batch_size], probs[:batch_size]
            yield (bt if isinstance(bt[0], str) else DocIds.join(bt)), np.stack(bp)


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

    def describe(self, note: str = "") -> str:
        """One line for a run's summary, e.g. "785 steps, dev every 300 (auto: ...)"; `note` ends the bracket."""
        return f"{self.steps:,} steps, dev every {self.eval_every} ({self.reason}{note})"


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


CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "train_state.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class Checkpointing:
    """Where and how often `fit` writes a resumable checkpoint, and what besides its own state it holds.

    `fit` saves the optimizers' states, its counters (step, epoch, batches consumed in the epoch, best dev accuracy
    and step, stale evaluations, history, seconds) and the torch, numpy and python random states; `get_state` /
    `set_state` add the caller's (the model's weights, its own generators). `key` identifies what is trained (config,
    data, starting point): a checkpoint written for another key is ignored, so a changed stage starts afresh.
    """

    folder: Path
    key: str
    get_state: Callable[[], dict[str, Any]]
    set_state: Callable[[dict[str, Any]], None]
    every_steps: int | None = None
    every_minutes: float | None = 5.0

    @property
    def path(self) -> Path:
        return Path(self.folder) / CHECKPOINT_FILE

    @property
    def enabled(self) -> bool:
        return self.every_steps is not None or self.every_minutes is not None

    def due(self, step: int, since: float) -> bool:
        """Whether a checkpoint is due after `step`, `since` seconds after the last one."""
        by_steps = self.every_steps is not None and step % self.every_steps == 0
        return by_steps or (self.every_minutes is not None and since >= self.every_minutes * 60)

    def save(self, state: dict[str, Any]) -> None:
        # One file renamed into place: a kill at any moment leaves the previous checkpoint or this one, whole.
        state = {"format": CHECKPOINT_FORMAT, "key": self.key, **state, "caller": self.get_state()}
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))

    def load(self) -> dict[str, Any] | None:
        """The checkpoint's state when there is one made for this key, else None (a mismatch is logged)."""
        if not self.path.exists():
            return None
        try:
            # Our own file, written by `save`: it holds numpy and python random states, which weights_only refuses.
            # Memory-mapped: a large table and its optimizer state are not held twice while they are loaded back
            # (private pages: the file is never written through).
            state = torch.load(self.path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # noqa: BLE001 (an unreadable checkpoint costs the progress it held, not the stage)
            logger.warning("%s: unreadable checkpoint ignored, training starts afresh (%s)", self.path, e)
            return None
        if state.get("format") != CHECKPOINT_FORMAT or state.get("key") != self.key:
            logger.info(
                "%s: checkpoint made for another config or data (key %s, this run %s) ignored; training starts afresh",
                self.path,
                state.get("key"),
                self.key,
            )
            return None
        return state

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        # A run killed while writing its next checkpoint left a temporary: swept too (its writer is gone).
        remove_temporaries(self.folder)
        try:
            Path(self.folder).rmdir()
        except OSError:
            pass  # not empty (someone else's files) or already gone


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    states["python"] = random.getstate()
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# Batches `fit` prepares ahead of the step (with `prepare`): enough to hide one slow batch, few enough to bound memory.
PREFETCH_DEPTH = 3
_DONE = object()


def prefetched(batches: Iterator[Any], prepare: Callable[[Any], Any], depth: int = PREFETCH_DEPTH) -> Iterator[Any]:
    """`prepare(batch)` for each batch, computed by a background thread up to `depth` batches ahead of the consumer,
    in order. The featuriser's kernel and PyTorch release the GIL, so preparing overlaps the training step. An error
    in the thread is raised here; a consumer that stops early (or fails) stops the thread."""
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in batches:
                if not put((prepare(batch), None)):
                    return
            put((_DONE, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put((None, e))

    thread = threading.Thread(target=work, name="sparse-distill-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = results.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join()


class WeightAverage:
    """An exponential moving average of parameters, updated at each dev evaluation (Polyak averaging).

    Dev is scored, and the best checkpoint saved, with the average swapped in (`swapped`: the tensors trade places, no
    copy), and training goes on from the weights themselves. With the high learning rates a sparse table wants, the
    weights at any one evaluation carry the noise of the last steps; their average does not.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay, self.updates = params, decay, 0
        self.average: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights into the average, bias-corrected as Adam's moments are: after n updates, snapshot
        k weighs (1 - decay) * decay^(n - k) / (1 - decay^n), so the first snapshots (a fine-tuning's starting model,
        say) do not dominate a short run's average."""
        self.updates += 1
        if not self.average:
            self.average = [p.detach().clone() for p in self.params]
            return
        rate = (1 - self.decay) / (1 - self.decay**self.updates)
        for a, p in zip(self.average, self.params, strict=True):
            a.mul_(1 - rate).add_(p.detach(), alpha=rate)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (the current ones back afterwards, even on error)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for i, p in enumerate(self.params):
            p.data, self.average[i] = self.average[i], p.data

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "average": [a.detach().cpu() for a in self.average]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        # Empty when the checkpoint was written before the first evaluation.
        saved = state["average"]
        self.average = [a.to(p.device) for a, p in zip(saved, self.params, strict=True)] if saved else []


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
    checkpoint: Checkpointing | None = None,
    prepare: Callable[[Any], Any] | None = None,
) -> TrainResult:
    """The one training loop of every student: steps over shuffled epochs, a learning-rate schedule, dev evaluation
    every `eval_every` steps, the best dev checkpoint kept (`save_best`), early stopping after `patience` evaluations
    without improvement.

    `train_step` returns the loss of one batch (the loop runs backward and the optimizer steps); `evaluate` returns
    the dev accuracy. `evaluate_first` scores the model before any step (fine-tuning: the starting model stays the
    best checkpoint unless training beats it on dev).

    With `checkpoint`, the loop's whole state is written every N steps or M minutes and a run finds it and resumes:
    the epoch's batches are replayed from its seeded start and the ones already consumed skipped, so a resumed run
    ends where an uninterrupted one would. The checkpoint is deleted when the loop finishes.

    With `prepare` (e.g. featurising a batch's texts), a background thread runs it on the next batches while the
    current step trains (see `prefetched`), and `train_step` receives its result.

    With `config.average_window` > 0, dev is scored and the best checkpoint saved on a moving average of the weights
    (see `WeightAverage`), updated at each evaluation; training goes on from the weights themselves.
    """
    if data.num_docs < 1:
        raise ValueError(f"{name}: no training documents")
    budget = plan_budget(data.num_docs, config)
    total = budget.steps
    warmup = math.ceil(config.warmup_ratio * total)
    # Read before a checkpoint is loaded: a saved optimizer holds the last step's scheduled rates, not the base ones.
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    best_acc, best_step, step, epoch, stale, skip, seconds_before = -1.0, 0, 0, 0, 0, 0, 0.0
    history: list[dict[str, float]] = []
    params = list({id(p): p for opt in optimizers for g in opt.param_groups for p in g["params"]}.values())
    average = None
    if config.average_window > 0:
        # An exponential average over about `average_window` of the budget, whatever the evaluation interval.
        average = WeightAverage(params, math.exp(-budget.eval_every / (config.average_window * total)))
    resumed = checkpoint.load() if checkpoint is not None and checkpoint.enabled else None
    if resumed is not None:
        assert checkpoint is not None
        for opt, opt_state in zip(optimizers, resumed["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        if average is not None and resumed.get("average") is not None:
            average.load_state_dict(resumed["average"])
        checkpoint.set_state(resumed["caller"])
        _set_rng_states(resumed["rng"])
        best_acc, best_step, stale = resumed["best_acc"], resumed["best_step"], resumed["stale"]
        step, epoch, skip, history = resumed["step"], resumed["epoch"], resumed["position"], resumed["history"]
        seconds_before = resumed["seconds"]
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
    if resumed is not None:
        logger.info(
            "%s%s: resuming from the checkpoint at step %d/%d (epoch %d, batch %d of it; best dev %.4f at step %d)",
            metric_prefix,
            name,
            step,
            total,
            epoch,
            skip,
            best_acc,
            best_step,
        )

    def check() -> bool:
        nonlocal best_acc, best_step, stale
        if average is not None:
            average.update()
        with average.swapped() if average is not None else nullcontext():
            acc = evaluate()
            improved = acc > best_acc
            if improved:
                save_best()
        history.append({"step": step, "dev_accuracy": acc})
        if on_metrics:
            on_metrics(step, {f"{metric_prefix}dev_accuracy": acc})
        which = " (averaged weights)" if average is not None else ""
        logger.info("%s%s step %d/%d: dev accuracy %.4f%s", metric_prefix, name, step, total, acc, which)
        if improved:
            best_acc, best_step, stale = acc, step, 0
            return False
        stale += 1
        return config.patience is not None and stale >= config.patience

    def write_checkpoint(position: int) -> None:
        assert checkpoint is not None
        checkpoint.save(
            {
                "step": step,
                "epoch": epoch,
                "position": position,
                "best_acc": best_acc,
                "best_step": best_step,
                "stale": stale,
                "history": list(history),
                "seconds": seconds_before + time.perf_counter() - start,
                "optimizers": [opt.state_dict() for opt in optimizers],
                "average": average.state_dict() if average is not None else None,
                "rng": _rng_states(),
            }
        )
        logger.info("%s%s: checkpoint written at step %d/%d (%s)", metric_prefix, name, step, total, checkpoint.path)

    stop = check() if evaluate_first and resumed is None else False
    last_checkpoint = time.monotonic()
    while step < total and not stop:
        # Each epoch's batch stream is seeded by its number: a resumed run replays it and skips what was consumed.
        batches = itertools.islice(data.epoch(epoch, config.batch_size), skip, None)
        if prepare is not None:
            batches = prefetched(batches, prepare)
        position, skip = skip, 0
        try:
            for batch in batches:
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
                position += 1
                if on_metrics and (step % 10 == 0 or step == 1):
                    on_metrics(step, {f"{metric_prefix}train_loss": loss.item()})
                if step % budget.eval_every == 0 or step == total:
                    stop = check()
                if step >= total or stop:
                    break
                if checkpoint is not None and checkpoint.due(step, time.monotonic() - last_checkpoint):
                    write_checkpoint(position)
                    last_checkpoint = time.monotonic()
        finally:
            if isinstance(batches, Generator):
                batches.close()  # stops the prefetch thread at once, whether the epoch ended, broke off or failed
        epoch += 1
    if not history or history[-1]["step"] != step:
        check()
    seconds = seconds_before + time.perf_counter() - start
    if checkpoint is not None:
        checkpoint.remove()
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
    pred = model(ids, offsets).argmax(-1).cpu().numpy()
    return float((pred == labels).mean()) if len(labels) else 0.0


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A numpy batch array on `device`: on a GPU through pinned memory, so the copy runs beside the computation."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


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
    checkpoint_dir: str | Path | None = None,
    checkpoint_key: str = "",
    loss: DistillLoss = "kl",
) -> TrainResult:
    """Train a DAN towards the batches' target distributions by `loss` (KL at `temperature`, or `logit_mse_loss`;
    see `fit`); the best dev model goes to `save_best`.

    The model trains on `config.device` (a GPU: the table and the step on it, bf16 autocast for the dense layers
    only). With `checkpoint_dir`, resumable checkpoints go there (see `Checkpointing`; `checkpoint_key` names what is
    trained, so only the same training resumes from them).
    """
    if model.config.members > 1:
        raise ValueError("a student of several members trains one member at a time: train it through train_dan")
    device = resolve_device(config.device)
    with SEEDED_DRAWS:
        torch.manual_seed(config.seed)
    model.to(device)
    optimizers = make_optimizers(model, config.lr, config.table_lr, config.table_optimizer)
    dev_ids, dev_offsets = (t.to(device) for t in to_tensors(vocab, dev_texts))
    dev_y = np.asarray(dev_labels)
    # bf16 for the dense layers on a GPU; the table's gather and the loss stay float32.
    autocast = device.type == "cuda"

    rng = np.random.default_rng(config.seed)

    # The compiled backward's grouping of each batch's occurrences by row depends on the ids alone: the prefetch thread
    # makes it ahead of the step, with its own table-long position array (not with n-gram dropout, which changes ids).
    plan_ahead = model.compiled_table_backward() and not config.ngram_dropout and model.config.pooling != "max"
    plan_position = np.full(model.config.vocab_size, -1, np.int64) if plan_ahead else None
    if plan_ahead:
        from sparse_distill.table_kernels import bag_plan  # numba: imported when a training needs it

    def featurize(batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray, BagPlan | None]:
        # Runs in `fit`'s prefetch thread, ahead of the step; batches featurised once already pass through.
        docs, targets = batch
        if isinstance(docs, DocIds):
            ids, offsets = docs.ids, docs.offsets
        else:
            ids, offsets = vocab.featurize(docs, engine="compiled")
        ids = np.asarray(ids, np.int64)
        plan = bag_plan(ids, offsets, plan_position) if plan_position is not None else None
        return ids, offsets, targets, plan

    if isinstance(data, InMemoryBatches) and data.docs is None:
        data = data.featurized(vocab)  # the train set: featurised once for all epochs

    # Chosen once, not per step.
    objective = logit_mse_loss if loss == "logit_mse" else functools.partial(kl_loss, temperature=temperature)

    def train_step(batch: tuple[np.ndarray, np.ndarray, np.ndarray, BagPlan | None]) -> torch.Tensor:
        ids, offsets, targets, plan = batch
        model.train()
        # Dropout here, in the training thread, so its random stream is the checkpointed one.
        if config.ngram_dropout:
            ids, offsets = drop_ngrams(ids, offsets, config.ngram_dropout, rng)
        pooled = model.pool(_to_device(ids, device), _to_device(offsets, device), plan)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model.head(pooled)
        return objective(logits.float(), _to_device(np.asarray(targets, np.float32), device))

    checkpoint = None
    if checkpoint_dir is not None:

        def get_state() -> dict[str, Any]:
            # No copy on a CPU: the checkpoint is written before the next step changes the table.
            weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            return {"model": weights, "dropout_rng": rng.bit_generator.state}

        def set_state(state: dict[str, Any]) -> None:
            model.load_state_dict(state["model"])
            rng.bit_generator.state = state["dropout_rng"]

        checkpoint = Checkpointing(
            Path(checkpoint_dir),
            checkpoint_key,
            get_state,
            set_state,
            config.checkpoint_every_steps,
            config.checkpoint_every_minutes,
        )

    # A row-wise table optimizer on the CPU steps the table inside the backward pass (no summed gradient written).
    with model.table_updated_in_backward(optimizers[0]):
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
            checkpoint=checkpoint,
            prepare=featurize,
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
    resume_key: str = "",
    loss: DistillLoss = "kl",
) -> dict[str, Any]:
    """Train a DAN into `out_dir/model` (the best dev checkpoint) and return its record.

    The model starts from `init_model` (a student folder: KD+FT), else fresh from `student` (then `init` may set
    its table, e.g. from the teacher's vectors). The pipeline's stages and the experiments all train through here.

    Resumable checkpoints go to `out_dir/checkpoint/`. Their key combines `resume_key` (the caller's fingerprint of
    the stage: its data and inputs) with the training and student settings, the vocabulary, the data size and the
    starting model, so a checkpoint left by a different configuration is ignored.

    A student of several members (`student.members`) is trained one member at a time (`_train_members`), each a
    DAN of `dim / members` columns with its own seed and data order, then merged into one model.
    """
    if student.member_count > 1:
        return _train_members(
            Path(out_dir), vocab_dir, data, dev_texts, dev_labels, label_map, student, config,
            init_model=init_model, init=init, on_metrics=on_metrics, metric_prefix=metric_prefix,
            resume_key=resume_key, loss=loss,
        )  # fmt: skip
    vocab = NgramVocab.load(vocab_dir)
    if init_model:
        model, _ = load_student(init_model, mmap=False)
    else:
        with SEEDED_DRAWS:
            torch.manual_seed(config.seed)
            model = student_from_config(len(vocab), label_map.num_classes, student)
            if init is not None:
                init(model)
    model_dir = Path(out_dir) / "model"
    key = _train_key(resume_key, config, student, init_model, vocab_dir, len(vocab), data, dev_texts, label_map, loss)
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
        loss=loss,
        evaluate_first=init_model is not None,
        checkpoint_dir=Path(out_dir) / CHECKPOINT_DIR,
        checkpoint_key=key,
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


def _train_key(
    resume_key: str,
    config: TrainConfig,
    student: StudentConfig,
    init_model: str | Path | None,
    vocab_dir: str | Path,
    vocab_size: int,
    data: BatchSource,
    dev_texts: list[str],
    label_map: LabelMap,
    loss: DistillLoss,
) -> str:
    """What a training is: the caller's `resume_key` (the stage's data and inputs), the settings, the starting model,
    the vocabulary and the data's size."""
    start = student if not init_model else str(Path(init_model).resolve())
    vocab = str(Path(vocab_dir).resolve())
    return fingerprint(
        "train_dan", resume_key, config, start, vocab, vocab_size, data.num_docs, len(dev_texts), label_map.to_json(),
        loss,
    )  # fmt: skip


MEMBERS_DIR = "members"
MEMBER_RECORD = "member.json"


def _train_members(
    out_dir: Path,
    vocab_dir: str | Path,
    data: BatchSource,
    dev_texts: list[str],
    dev_labels: list[int],
    label_map: LabelMap,
    student: StudentConfig,
    config: TrainConfig,
    *,
    init_model: str | Path | None,
    init: Callable[[DanStudent], None] | None,
    on_metrics: MetricsCallback | None,
    metric_prefix: str,
    resume_key: str,
    loss: DistillLoss,
) -> dict[str, Any]:
    """`train_dan` for a student of several members: each trained on its own, as a single DAN of `dim / members`
    columns with seed `config.seed + k` and its own data order (members trained together on the same batches
    differed too little to gain as an ensemble: README, 'Members'), then merged (`merge_members`). A member that
    finished is kept in `out_dir/members/k/` with its record, so a killed stage resumes at the next member. From
    `init_model` (KD+FT), member k starts from that student's member k."""
    k = student.member_count
    single = student.model_copy(update={"dim": student.dim // k, "members": 1})
    start = load_student(init_model, mmap=False) if init_model else None
    if start is not None and start[0].config.members != k:
        raise ValueError(f"{init_model}: a student of {start[0].config.members} members, not {k}")
    vocab = NgramVocab.load(vocab_dir)
    vocab_size = len(vocab)
    # The starting model counts by its weights file's stamp, as a KD stage may be retrained.
    init_stamp = file_fingerprint(str(Path(init_model) / STUDENT_WEIGHTS)) if init_model else None
    member_inits: list[Callable[[DanStudent], None] | None] = [None] * k
    if init is not None:
        # `init` sets up the whole student (e.g. a trained one's weights, or a table from vectors); each member then
        # starts from its share of it.
        with SEEDED_DRAWS:
            torch.manual_seed(config.seed)
            whole = student_from_config(vocab_size, label_map.num_classes, student)
            init(whole)
        shares = [split_member(whole, m).state_dict() for m in range(k)]
        member_inits = [functools.partial(_load_share, share=share) for share in shares]
    records = []
    for m in range(k):
        member_dir = out_dir / MEMBERS_DIR / str(m)
        member_config = config.model_copy(update={"seed": config.seed + m})
        # A finished member is reused only under the caller's resume key (the pipeline's stage fingerprint, which
        # names the data).
        train_key = _train_key(
            resume_key, member_config, single, None, vocab_dir, vocab_size, data, dev_texts, label_map, loss
        )
        key = fingerprint("member", train_key, init_stamp, m, k)
        record_file = member_dir / MEMBER_RECORD
        done = json.loads(record_file.read_text()) if resume_key and record_file.exists() else None
        if done is None or done.get("key") != key or not Path(done["model_dir"]).exists():
            logger.info("member %d of %d: training", m + 1, k)
            member_init = None
            if start is not None:
                member_init = save_student(split_member(start[0], m), start[1], vocab_dir, member_dir / "init")
            done = train_dan(
                member_dir, vocab_dir, _reseeded(data, m), dev_texts, dev_labels, label_map, single, member_config,
                init_model=member_init, init=member_inits[m], on_metrics=on_metrics,
                metric_prefix=f"{metric_prefix}member{m}_",
                resume_key=f"{resume_key}:member{m}", loss=loss,
            )  # fmt: skip
            atomic_write_text(record_file, json.dumps({**done, "key": key}))
        else:
            logger.info("member %d of %d: done already (%s)", m + 1, k, member_dir)
        records.append(done)
    merged = merge_members([load_student(r["model_dir"], mmap=False)[0] for r in records])
    model_dir = out_dir / "model"
    save_student(merged, label_map, vocab_dir, model_dir)
    # The merged model holds every member: their folders (a table's worth of disk each) go, their records stay.
    for m in range(k):
        for folder in ("model", "init"):
            shutil.rmtree(out_dir / MEMBERS_DIR / str(m) / folder, ignore_errors=True)
    dev_ids, dev_offsets = to_tensors(vocab, dev_texts)
    dev_accuracy = accuracy(merged, dev_ids, dev_offsets, np.asarray(dev_labels))
    logger.info(
        "%d members: dev accuracy %.4f together (%s alone)",
        k, dev_accuracy, ", ".join(f"{r['dev_accuracy']:.4f}" for r in records),
    )  # fmt: skip
    if on_metrics is not None:
        # Each member's curve is logged under its own name (`<prefix>member<k>_...`); the merged model's score once.
        on_metrics(max(r["steps"] for r in records), {f"{metric_prefix}dev_accuracy": dev_accuracy})
    return {
        "model_dir": str(model_dir),
        "dev_accuracy": dev_accuracy,
        # The first member's step counts and budget (each member has the same budget); every member's below.
        "best_step": records[0]["best_step"],
        "steps": records[0]["steps"],
        "seconds": round(sum(r["seconds"] for r in records), 3),
        "params": merged.param_counts(),
        "budget": records[0]["budget"],
        "members": [{key: r[key] for key in ("dev_accuracy", "best_step", "steps", "seconds")} for r in records],
    }


def _load_share(model: DanStudent, share: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(share)


def _reseeded(data: BatchSource, member: int) -> BatchSource:
    """The same documents in member `member`'s own order: a batch source whose epochs are seeded by `seed + epoch`
    gets its seed moved by 1000 per member (past any epoch count), so no member replays another's order."""
    if member == 0 or not is_dataclass(data) or not hasattr(data, "seed"):
        return data
    return replace(data, seed=data.seed + 1000 * member)


def student_from_config(vocab_size: int, num_classes: int, student_cfg: StudentConfig) -> DanStudent:
    """A fresh DAN from the student section of the config."""
    return DanStudent(
        DanConfig(
            vocab_size=vocab_size,
            num_classes=num_classes,
            # Each member gets dim // members columns.
            dim=student_cfg.dim // student_cfg.member_count * student_cfg.member_count,
            hidden=student_cfg.hidden,
            pooling=student_cfg.pooling,
            layers=student_cfg.layers,
            dropout=student_cfg.dropout,
            init_std=student_cfg.init_std,
            members=student_cfg.member_count,
        )
    )
