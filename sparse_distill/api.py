"""The Python API for notebooks: load a student from a folder or MLflow, predict, explain.

```python
from sparse_distill import load_student

student = load_student("runs:/<run_id>/student")      # or a folder, or "models:/NAME@champion"
student.predict(df["text"])                            # labels as in the train set (a Series for a Series)
student.predict_proba(["a gorgeous, witty film"])      # DataFrame, one column per label
student.predict_one("dull and far too long")           # Prediction(label, probability, probabilities)
student.explain("dull and far too long")               # the n-grams that carried the prediction
student.top_ngrams(10)                                 # per label, the n-grams that speak for it on their own
```

Loading a local folder imports neither MLflow nor Prefect; an MLflow URI imports MLflow to download the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from sparse_distill.explanation import Explanation
    from sparse_distill.inference import StudentPredictor

logger = logging.getLogger(__name__)

# What `predict`/`predict_proba` accept: a list or tuple of str, a numpy array of str, a pandas Series, or a
# DataFrame with a `text` column or a single column.
Texts = Any


@dataclass(frozen=True)
class Prediction:
    """One text's prediction: the label (as in the train set), its probability, and every label's."""

    label: Any
    probability: float
    probabilities: dict[Any, float]


def _texts(texts: Texts) -> tuple[list[str], Any]:
    """The texts as a list of str, and the pandas index to give the outputs (None for a list or an array)."""
    import numpy as np

    index = None
    if isinstance(texts, str):
        raise TypeError("expected several texts (a list, a Series, a DataFrame column); use predict_one for one text")
    module = type(texts).__module__.split(".")[0]
    if module == "pandas":
        import pandas as pd

        if isinstance(texts, pd.DataFrame):
            if "text" in texts.columns:
                texts = texts["text"]
            elif texts.shape[1] == 1:
                texts = texts.iloc[:, 0]
            else:
                raise ValueError(f"a DataFrame needs a 'text' column or exactly one column; got {list(texts.columns)}")
        index = texts.index
        values = texts.tolist()
    elif isinstance(texts, np.ndarray):
        if texts.ndim != 1:
            raise ValueError(f"a text array must be 1-D, got shape {texts.shape}")
        values = texts.tolist()
    else:
        values = list(texts)
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"text {row}: expected a string, got {type(value).__name__} ({value!r:.50})")
    return values, index


class Student:
    """A loaded student model: raw texts in, labels and probabilities out; explanations of its decisions."""

    def __init__(self, predictor: StudentPredictor, source: str | None = None) -> None:
        self.predictor = predictor
        # Where it was loaded from (a folder or an MLflow URI), for the repr.
        self.source = source

    def __repr__(self) -> str:
        c = self.predictor.model.config
        return (
            f"Student(source={self.source!r}, labels={self.labels!r}, ngrams={c.vocab_size:,}, dim={c.dim}, "
            f"pooling={c.pooling!r}" + (f", members={c.members})" if c.members > 1 else ")")
        )

    @property
    def labels(self) -> list:
        """The labels, in the order of the probability columns (values as in the train set)."""
        return self.predictor.labels

    def predict_proba(self, texts: Texts, batch_size: int = 1024) -> pd.DataFrame:
        """Class probabilities: a DataFrame with one column per label (the input's index for a Series/DataFrame)."""
        import pandas as pd

        values, index = _texts(texts)
        probs = self.predictor.predict_proba(values, batch_size)
        return pd.DataFrame(probs.astype("float64"), columns=pd.Index(self.labels, dtype=object), index=index)

    def predict(self, texts: Texts, batch_size: int = 1024) -> list | pd.Series:
        """Predicted labels (values as in the train set): a list, or a Series with the input's index for pandas
        input."""
        values, index = _texts(texts)
        labels = self.predictor.predict(values, batch_size)
        if index is None:
            return labels
        import pandas as pd

        return pd.Series(labels, index=index, name="label", dtype=object)

    def predict_one(self, text: str) -> Prediction:
        """The low-latency path for one text."""
        probs = self.predictor.predict_one(text)
        best = int(probs.argmax())
        return Prediction(self.labels[best], float(probs[best]), _by_label(self.labels, probs))

    def explain(self, text: str, top: int = 10) -> Explanation:
        """The prediction for `text` and its `top` n-grams by their effect on the predicted class's probability."""
        from sparse_distill.explanation import explain_text

        return explain_text(self.predictor, text, top)

    def top_ngrams(self, k: int = 20) -> dict[Any, list[tuple[str, float]]]:
        """For each label, the `k` n-grams that score highest for it on their own (log-odds)."""
        from sparse_distill.explanation import top_ngrams

        return top_ngrams(self.predictor, k)


def _by_label(labels: list, probs: np.ndarray) -> dict[Any, float]:
    return {label: float(p) for label, p in zip(labels, probs, strict=True)}


def student_dir_from_mlflow(uri: str, tracking_uri: str | None = None, dst_path: str | None = None) -> Path:
    """Download a logged student (`runs:/RUN/student`, `models:/NAME@alias`, `models:/m-...`) and return the student
    folder inside it (the pyfunc model carries the folder as its `model_dir` artifact)."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst_path))
    found = sorted(p.parent for p in local.rglob("student.safetensors"))
    if not found:
        raise FileNotFoundError(f"{uri}: no student model inside (downloaded to {local})")
    if len(found) > 1:
        # A cascade carries the student and nothing else of that kind; more than one would be ambiguous.
        raise ValueError(f"{uri}: {len(found)} student folders inside ({[str(f) for f in found]})")
    return found[0]


def load_student(
    model: str | Path, threads: int = 1, tracking_uri: str | None = None, max_order: int | None = None
) -> Student:
    """A student from a model folder, or from MLflow (`runs:/RUN_ID/student`, `models:/NAME@alias`,
    `models:/NAME/VERSION`): downloaded once, then loaded from the local copy.

    `threads`: batches predicted at once; `tracking_uri`: the MLflow store of an MLflow URI (default: MLflow's own
    resolution, e.g. MLFLOW_TRACKING_URI).
    """
    from sparse_distill.commands import is_mlflow_uri
    from sparse_distill.inference import StudentPredictor

    source = str(model)
    folder = student_dir_from_mlflow(source, tracking_uri) if is_mlflow_uri(source) else Path(model)
    logger.debug("loading the student in %s", folder)
    return Student(StudentPredictor.load(folder, threads=threads, max_order=max_order), source)
