"""The student's forward pass in numpy: predicting from a model folder without importing torch.

A DAN at inference is a gather of table rows, a pooling per document and two small matrix products, all of which
numpy does as well as PyTorch for one process's batches. Importing torch costs about a second of start-up, more
than predicting a file of short texts takes, so `sparse-distill predict` on a local folder runs this engine. It
reads the same safetensors file (memory-mapped) and gives the same logits as `student.DanStudent` up to float
rounding (tests/test_numpy_student.py checks every table dtype and pooling).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sparse_distill.dan_config import LABEL_MAP, STUDENT_WEIGHTS, DanConfig, read_dan_config
from sparse_distill.data import DataError, LabelMap


class NumpyDanStudent:
    """A trained DAN's weights as numpy arrays, with the same `forward(ids, offsets) -> logits` as `DanStudent`."""

    def __init__(self, config: DanConfig, weights: dict[str, np.ndarray]) -> None:
        self.config = config
        try:
            # The int8 table is PyTorch's fused row-wise layout: d code bytes, then a float32 scale and offset.
            self.table = weights["embedding.packed" if config.table_dtype == "int8" else "embedding.weight"]
            self.dense = [(weights["fc1.weight"], weights["fc1.bias"])]
            self.dense += [(weights[f"extra.{i}.weight"], weights[f"extra.{i}.bias"]) for i in range(config.layers - 1)]
            self.dense.append((weights["fc2.weight"], weights["fc2.bias"]))
        except KeyError as e:
            raise DataError(f"student weights lack the tensor {e} that a {config.table_dtype} DAN needs") from e
        width = config.dim + 8 if config.table_dtype == "int8" else config.dim
        if self.table.shape != (config.vocab_size, width):
            raise DataError(f"n-gram table of shape {self.table.shape}, the config says ({config.vocab_size}, {width})")

    def table_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the n-gram table as float32 (an int8 table dequantised row by row), shape (len(ids), dim)."""
        rows = self.table[ids]
        if self.config.table_dtype == "int8":
            # `student.Int8EmbeddingBag`'s layout (d code bytes, then float32 scale and bias), read without torch.
            scale_bias = np.ascontiguousarray(rows[:, self.config.dim :]).view(np.float32)
            return rows[:, : self.config.dim].astype(np.float32) * scale_bias[:, :1] + scale_bias[:, 1:]
        return rows.astype(np.float32, copy=False)

    def pool(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """The pooled n-gram vector of each bag, `[bags, dim]`; an empty bag pools to zeros, as in EmbeddingBag."""
        n_docs = len(offsets)
        sizes = np.diff(offsets, append=len(ids))
        pooled = np.zeros((n_docs, self.config.dim), np.float32)
        filled = sizes > 0
        if not filled.any():
            return pooled
        rows = self.table_rows(ids)
        # reduceat over the non-empty bags only: it reads an empty bag's start as a one-row bag.
        reduce = np.maximum if self.config.pooling == "max" else np.add
        pooled[filled] = reduce.reduceat(rows, offsets[filled], axis=0)
        if self.config.pooling == "mean":
            pooled[filled] /= sizes[filled, None].astype(np.float32)
        return pooled

    def head(self, pooled: np.ndarray) -> np.ndarray:
        """The dense layers: pooled vectors to logits. Several members (weights `[members, out, in]`) each read their
        share of the columns; the result is the log of the mean of their probabilities, as `DanStudent.head`."""
        k = self.config.members
        # [members, n, dim / members]: member k reads its own block of columns.
        hidden = pooled[None] if k == 1 else pooled.reshape(len(pooled), k, -1).transpose(1, 0, 2)
        for i, (weight, bias) in enumerate(self.dense):
            weight, bias = (weight[None], bias[None]) if k == 1 else (weight, bias)
            hidden = hidden @ weight.transpose(0, 2, 1) + bias[:, None, :]
            if i < len(self.dense) - 1:
                hidden = np.maximum(hidden, 0)
        if k == 1:
            return hidden[0]
        shifted = hidden - hidden.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        top = log_probs.max(axis=0)
        return top + np.log(np.exp(log_probs - top).mean(axis=0))

    def __call__(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Logits for a batch of bags: `ids` flat row ids, `offsets` each bag's start (int64 arrays)."""
        return self.head(self.pool(ids, offsets))

    def param_counts(self) -> dict[str, int]:
        """Total, sparse (embedding table) and dense parameter counts."""
        sparse = self.config.vocab_size * self.config.dim
        dense = sum(w.size + b.size for w, b in self.dense)
        return {"total": sparse + dense, "sparse": sparse, "dense": dense}


# safetensors dtype -> numpy dtype, for the dtypes a student folder holds.
_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I8": np.int8, "F64": np.float64, "I64": np.int64}


def read_safetensors_mmap(path: str | Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as read-only numpy views of one memory map: nothing is read until used, so a
    multi-GB table costs no start-up and its pages are shared between processes (the format: an 8-byte header
    length, a JSON header of dtype, shape and byte range per tensor, then the data)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= 100_000_000:
                raise ValueError(f"header length {header_len}")
            header = json.loads(f.read(header_len))
        data = (
            np.memmap(path, np.uint8, mode="r", offset=8 + header_len) if path.stat().st_size > 8 + header_len else None
        )
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = np.dtype(_DTYPES[info["dtype"]])
            start, stop = info["data_offsets"]
            shape = tuple(info["shape"])
            if stop - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise ValueError(f"tensor {name!r}: {stop - start} bytes for shape {shape} of {info['dtype']}")
            raw = data[start:stop] if data is not None else np.zeros(0, np.uint8)
            if len(raw) != stop - start:
                raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
            out[name] = raw.view(dtype).reshape(shape)
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e!r})") from e


def load_numpy_student(model_dir: str | Path) -> tuple[NumpyDanStudent, LabelMap]:
    """Load a student folder's weights as memory-mapped numpy arrays (no torch import), with its label map."""
    model_dir = Path(model_dir)
    config = read_dan_config(model_dir)
    weights = read_safetensors_mmap(model_dir / STUDENT_WEIGHTS)
    try:
        model = NumpyDanStudent(config, weights)
    except DataError as e:
        raise DataError(f"{model_dir / STUDENT_WEIGHTS}: {e}") from e
    return model, LabelMap.load(model_dir / LABEL_MAP)
