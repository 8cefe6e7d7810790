"""The teacher's-vectors experiment (benchmarks/hidden_distill.py): the vectors it distils are what the teacher's
classifier reads, text by text, whatever order it computes them in, and a cache of another set of texts is not used."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hidden_distill.py"


def _experiment():
    spec = importlib.util.spec_from_file_location("hidden_distill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_teacher_vectors_are_its_classifier_inputs_in_the_texts_order(tiny_teacher, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["a fine film", "dull", "the plot was slow and the acting was worse than the plot", "fun fun fun", "ok"]
    cache = tmp_path / "vectors.npz"
    # Batches of two, texts of different lengths: the shortest-first order has to be undone.
    vectors = _experiment().teacher_vectors(tiny_teacher, texts, 32, cache, batch_size=2)
    assert vectors.shape[0] == len(texts) and cache.exists()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    with torch.inference_mode():
        for text, vector in zip(texts, vectors, strict=True):
            logits = model(**tokenizer([text], truncation=True, max_length=32, return_tensors="pt")).logits[0]
            np.testing.assert_allclose(model.classifier(torch.from_numpy(vector)).numpy(), logits.numpy(), atol=1e-4)
    # The cache serves the same texts again; other texts (even as many) are computed again.
    with np.load(cache) as stored:
        np.savez(cache, vectors=np.zeros_like(vectors), fingerprint=stored["fingerprint"])
    assert not _experiment().teacher_vectors(tiny_teacher, texts, 32, cache).any()
    again = _experiment().teacher_vectors(tiny_teacher, texts[::-1], 32, cache)
    np.testing.assert_allclose(again, vectors[::-1], atol=1e-5)
