"""The inference engine: raw texts in, class probabilities out, with the training-time featuriser.

Featurising (tokenise, hash the words, build n-gram keys, probe the hash table) is one compiled pass per batch
(`ngram_kernels`); the model is an embedding-bag gather and two small dense layers. `threads` runs batches side by side
on a thread pool sharing one model: the kernel and PyTorch release the GIL, so batches use several cores. One text at
a time goes through `predict_one`, which skips the batching. A process that predicts a few texts and exits loads the
student with `engine="numpy"`: neither torch nor numba is imported (see `numpy_student`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from sparse_distill.data import LabelMap
from sparse_distill.numpy_student import NumpyDanStudent, load_numpy_student
from sparse_distill.vocab import FeaturizeEngine, NgramVocab

if TYPE_CHECKING:
    import pandas as pd

    from sparse_distill.student import DanStudent

# How a loaded student computes: "torch" (DanStudent: fused embedding-bag kernels, several threads) or "numpy"
# (NumpyDanStudent and, for small inputs, the Python featuriser: no torch or numba import, so a process that predicts a
# few texts starts in well under a second; slower per batch).
PredictEngine = Literal["torch", "numpy"]

logger = logging.getLogger(__name__)

LABEL_COLUMN = "label"
PROB_PREFIX = "prob_"


def default_threads() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class StudentPredictor:
    """A loaded student: featurises raw texts with its own vocabulary and returns class probabilities.

    `threads`: batches predicted at once (default 1). With more than one, PyTorch's own intra-op pool is set to one
    thread, since the batches already keep the cores busy (this is process-wide in PyTorch).
    """

    def __init__(
        self,
        model: DanStudent | NumpyDanStudent,
        vocab: NgramVocab,
        label_map: LabelMap,
        threads: int = 1,
        max_order: int | None = None,
        featurize_engine: FeaturizeEngine = "compiled",
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.model = model if isinstance(model, NumpyDanStudent) else model.eval()
        self.vocab = vocab
        self.label_map = label_map
        self.threads = threads
        # Use only n-grams up to this length (the n-gram-order ablation); None: all the vocabulary has.
        self.max_order = max_order
        self.featurize_engine = featurize_engine
        self._pool: ThreadPoolExecutor | None = None
        if threads > 1 and not isinstance(model, NumpyDanStudent):
            import torch

            torch.set_num_threads(1)

    @classmethod
    def load(
        cls, model_dir: str | Path, threads: int = 1, max_order: int | None = None, engine: PredictEngine = "torch"
    ) -> StudentPredictor:
        """Load a model folder written by `save_student` (the table memory-mapped, so processes share its pages).

        `engine="numpy"` loads it without torch (see `PredictEngine`): for processes that predict a few texts and exit.
        """
        if engine == "numpy":
            model, label_map = load_numpy_student(model_dir)
            vocab = NgramVocab.load(model_dir)
            return cls(model, vocab, label_map, threads=threads, max_order=max_order, featurize_engine="auto")
        if engine != "torch":
            raise ValueError(f"engine must be torch or numpy, not {engine!r}")
        from sparse_distill.student import load_student

        torch_model, label_map = load_student(model_dir)
        return cls(torch_model, NgramVocab.load(model_dir), label_map, threads=threads, max_order=max_order)

    @property
    def labels(self) -> list:
        return list(self.label_map.labels)

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    def _logits(self, texts: list[str]) -> np.ndarray:
        ids, offsets = self.vocab.featurize(texts, self.max_order, engine=self.featurize_engine)
        if isinstance(self.model, NumpyDanStudent):
            return self.model(ids, offsets)
        import torch  # loaded already: the model is a torch module

        with torch.inference_mode():
            return self.model(torch.from_numpy(ids), torch.from_numpy(offsets)).numpy()

    def predict_logits(self, texts: list[str], batch_size: int = 1024) -> np.ndarray:
        """Logits, shape (len(texts), num_classes)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
        if not batches:
            return np.zeros((0, self.num_classes), np.float32)
        if self.threads > 1 and len(batches) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="sparse-distill-predict")
            return np.concatenate(list(self._pool.map(self._logits, batches)))
        return np.concatenate([self._logits(b) for b in batches])

    def predict_proba(self, texts: list[str], batch_size: int = 1024) -> np.ndarray:
        """Class probabilities, shape (len(texts), num_classes)."""
        return _softmax(self.predict_logits(texts, batch_size))

    def predict(self, texts: list[str], batch_size: int = 1024) -> list:
        """Predicted label values (as in the train set's label column)."""
        return [self.label_map.decode(int(i)) for i in self.predict_logits(texts, batch_size).argmax(axis=1)]

    def predict_one(self, text: str) -> np.ndarray:
        """Class probabilities of one text (shape (num_classes,)): the low-latency path."""
        return _softmax(self._logits([text]))[0]

    def close(self) -> None:
        """Stop the thread pool (a predictor is usable again afterwards)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def predictions_table(probs: np.ndarray, labels: list) -> pd.DataFrame:
    """The prediction output of the CLI and the pyfunc model: column `label` (label values as in the train set) and
    `prob_<label>` per class. Here rather than in `mlflow_model` so that predicting from a folder needs no MLflow."""
    import pandas as pd

    probs = probs.astype(np.float64)
    predicted = [labels[i] for i in probs.argmax(axis=1)] if len(probs) else []
    label_dtype = object if any(isinstance(v, str) for v in labels) else None
    frame = {LABEL_COLUMN: pd.Series(predicted, dtype=label_dtype)}
    for j, label in enumerate(labels):
        frame[f"{PROB_PREFIX}{label}"] = probs[:, j]
    return pd.DataFrame(frame)


def predictions_frame(predictor: StudentPredictor, texts: list[str], batch_size: int = 1024) -> pd.DataFrame:
    """`predictions_table` of a student's predictions for `texts`."""
    return predictions_table(predictor.predict_proba(texts, batch_size), predictor.labels)
