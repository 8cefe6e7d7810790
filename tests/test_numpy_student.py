"""The torch-free prediction path: the numpy DAN against the torch one (every pooling and table dtype), the
safetensors memory map, the Python featuriser against the compiled kernel, and a predict run that imports neither
torch nor numba."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_distill.config import StudentConfig
from sparse_distill.data import DataError, LabelMap
from sparse_distill.inference import StudentPredictor
from sparse_distill.numpy_student import load_numpy_student, read_safetensors_mmap
from sparse_distill.student import STUDENT_WEIGHTS, load_student, quantize_student, save_student
from sparse_distill.training import student_from_config
from sparse_distill.vocab import build_vocab

TRAIN = ["a great film", "a dull film", "great great fun", "not a word we know", "dull and great", "the film was great"]
# Empty documents at the start, in the middle and at the end: the pooling must give them zeros.
TEXTS = ["", "a great film", "zzz qqq", "the film was great and great fun", "", "dull", ""]
UNICODE = ["Ça VA très BIEN, naïve café", "İstanbul straße ΣΟΦΙΑ ǅemal", "x_y 12 __ 3a a", "emoji 😀 ok ok", ""]


def _student(tmp_path: Path, pooling: str = "mean", layers: int = 1, members: int = 1) -> Path:
    vocab = build_vocab(TRAIN, 100, 3)
    vocab.save(tmp_path / "vocab")
    torch.manual_seed(0)
    config = StudentConfig(dim=6, hidden=5, pooling=pooling, layers=layers, members=members)
    model = student_from_config(len(vocab), 3, config)
    return save_student(model, LabelMap.from_values(["a", "b", "c"]), tmp_path / "vocab", tmp_path / "model")


def _logits_both(model_dir: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    torch_predictor = StudentPredictor.load(model_dir)
    numpy_predictor = StudentPredictor.load(model_dir, engine="numpy")
    return torch_predictor.predict_logits(texts), numpy_predictor.predict_logits(texts)


@pytest.mark.parametrize(
    ("pooling", "layers", "members"),
    [("mean", 1, 1), ("sum", 1, 1), ("max", 1, 1), ("sum", 3, 1), ("sum", 1, 3), ("mean", 2, 2)],
)
def test_numpy_student_gives_the_torch_logits(tmp_path, pooling, layers, members):
    expected, got = _logits_both(_student(tmp_path, pooling, layers, members), TEXTS)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # the empty documents are predicted from the biases alone, the same for all of them
    np.testing.assert_allclose(got[0], got[4])
    assert not np.allclose(got[0], got[1])


@pytest.mark.parametrize("table_dtype", ["float16", "int8"])
def test_numpy_student_reads_quantised_tables(tmp_path, table_dtype):
    small = quantize_student(_student(tmp_path, "sum"), tmp_path / table_dtype, table_dtype)
    expected, got = _logits_both(small, TEXTS)
    # torch pools a float16 table in float16, numpy in float32: they agree to float16's precision.
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("members", [1, 2])
def test_numpy_student_counts_parameters_as_torch_does(tmp_path, members):
    model_dir = _student(tmp_path, layers=2, members=members)
    assert load_numpy_student(model_dir)[0].param_counts() == load_student(model_dir)[0].param_counts()


def test_safetensors_memory_map_matches_the_file_and_names_a_truncated_one(tmp_path):
    model_dir = _student(tmp_path)
    torch_state = load_student(model_dir)[0].state_dict()
    arrays = read_safetensors_mmap(model_dir / STUDENT_WEIGHTS)
    assert set(arrays) == set(torch_state)
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, torch_state[name].numpy())
    data = (model_dir / STUDENT_WEIGHTS).read_bytes()
    (model_dir / STUDENT_WEIGHTS).write_bytes(data[: len(data) - 40])
    with pytest.raises(DataError, match=STUDENT_WEIGHTS):
        load_numpy_student(model_dir)


def test_wrong_table_shape_is_an_error_naming_the_file(tmp_path):
    model_dir = _student(tmp_path)
    config = (model_dir / "student.json").read_text()
    (model_dir / "student.json").write_text(config.replace('"dim": 6', '"dim": 7'))
    with pytest.raises(DataError, match=rf"{STUDENT_WEIGHTS}.*shape"):
        load_numpy_student(model_dir)


@pytest.mark.parametrize("max_order", [None, 1, 2])
def test_python_featuriser_gives_the_kernel_ids(max_order):
    # A prefix-closed vocabulary (the top |V| of counted n-grams) and one that is not (hand-picked n-grams).
    texts = TEXTS + UNICODE + TRAIN
    counted = build_vocab(texts, 1000, 3)
    picked = build_vocab(["film was great", "great fun", "ça", "straße", "ok ok", "the"], 10, 3).top(4)
    for vocab in (counted, picked):
        python_ids = vocab.featurize(texts, max_order, engine="python")
        kernel_ids = vocab.featurize(texts, max_order, engine="compiled")
        for got, expected in zip(python_ids, kernel_ids, strict=True):
            np.testing.assert_array_equal(got, expected)
        assert python_ids[0].dtype == np.int64 and python_ids[1].dtype == np.int64
    with pytest.raises(ValueError, match="engine"):
        counted.featurize(texts, engine="fast")


def test_local_predict_imports_neither_torch_nor_numba(tmp_path):
    model_dir = _student(tmp_path)
    code = (
        "import sys\n"
        "from sparse_distill.commands import predict_texts\n"
        f"frame = predict_texts({str(model_dir)!r}, ['a great film', ''])\n"
        "print(list(frame['label']))\n"
        "heavy = ('torch', 'numba', 'mlflow', 'prefect', 'sparse_distill.config')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[-1] == "[]"
    assert out[-2] == str(StudentPredictor.load(model_dir).predict(["a great film", ""]))
