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


def test_a_teacher_fine_tuned_on_head_and_tail_gets_the_vectors_of_head_and_tail(tiny_teacher, tmp_path):
    import json
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparse_distill.teacher import TRAINING_INFO, padded_inputs

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    (teacher / TRAINING_INFO).write_text(json.dumps({"truncation": "head_tail"}))
    text = " ".join(["a fine film"] * 10 + ["but the ending was dull and slow"])
    vector = _experiment().teacher_vectors(teacher, [text], 8, tmp_path / "vectors.npz")[0]
    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher)

    def pooled(truncation: str) -> np.ndarray:
        out = model.base_model(**padded_inputs(tokenizer, [text], 8, truncation, "cpu"))
        return (out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0])[0].numpy()

    with torch.inference_mode():
        head_tail, head = pooled("head_tail"), pooled("head")
    assert np.abs(head - head_tail).max() > 1e-4  # the text's tail changes what the teacher reads
    np.testing.assert_allclose(vector, head_tail, atol=1e-6)
