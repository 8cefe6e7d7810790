"""Raw text in, probabilities out: the student (and the teacher) as predictors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from sparse_distill.student import DanStudent, load_student
from sparse_distill.vocab import NgramVocab

logger = logging.getLogger(__name__)


class StudentPredictor:
    """A loaded student: featurises raw texts with its own vocabulary and returns class probabilities."""

    def __init__(self, model: DanStudent, vocab: NgramVocab, label_map) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self.label_map = label_map

    @classmethod
    def load(cls, model_dir: str | Path) -> StudentPredictor:
        """Load a model folder written by `save_student`."""
        model, label_map = load_student(model_dir)
        return cls(model, NgramVocab.load(model_dir), label_map)

    @property
    def labels(self) -> list:
        return list(self.label_map.labels)

    @torch.inference_mode()
    def predict_logits(self, texts: list[str], batch_size: int = 1024) -> np.ndarray:
        """Logits, shape (len(texts), num_classes)."""
        out = []
        for i in range(0, len(texts), batch_size):
            ids, offsets = self.vocab.featurize(texts[i : i + batch_size])
            out.append(self.model(torch.from_numpy(ids), torch.from_numpy(offsets)).float().numpy())
        if not out:
            return np.zeros((0, self.model.config.num_classes), np.float32)
        return np.concatenate(out)

    def predict_proba(self, texts: list[str], batch_size: int = 1024) -> np.ndarray:
        """Class probabilities, shape (len(texts), num_classes)."""
        logits = torch.from_numpy(self.predict_logits(texts, batch_size))
        return torch.softmax(logits, dim=-1).numpy()

    def predict(self, texts: list[str], batch_size: int = 1024) -> list:
        """Predicted label values (as in the train set's label column)."""
        return [self.label_map.decode(int(i)) for i in self.predict_proba(texts, batch_size).argmax(axis=1)]
