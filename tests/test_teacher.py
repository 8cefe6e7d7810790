"""The teacher: its train sample, and its mean-pooled encoder."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_distill.teacher import sample_rows


def test_a_train_sample_of_a_label_sorted_file_holds_every_label_and_is_seeded():
    labels = ["neg"] * 500 + ["pos"] * 500  # IMDB's train file is sorted like this
    rows = sample_rows(len(labels), 100, seed=13)
    assert len(rows) == len(set(rows)) == 100 and rows == sorted(rows)
    assert 30 < sum(labels[i] == "pos" for i in rows) < 70
    assert rows == sample_rows(len(labels), 100, seed=13) != sample_rows(len(labels), 100, seed=14)
    assert sample_rows(10, 50, seed=1) == list(range(10))


def test_encode_gives_one_mean_pooled_vector_per_text(tiny_teacher):
    import numpy as np

    from sparse_distill.teacher import TeacherPredictor

    teacher = TeacherPredictor(tiny_teacher, max_length=16)
    texts = ["great film", "dull", "great film", "a boring plot and weak actors"]
    vectors = teacher.encode(texts, batch_size=3)
    assert vectors.shape == (4, teacher.model.config.hidden_size)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-5)  # padding in another batch changes nothing
    assert not np.allclose(vectors[0], vectors[1])
    np.testing.assert_allclose(teacher.encode(texts[:1], batch_size=1)[0], vectors[0], atol=1e-5)


def test_whole_words_of_wordpiece_bpe_and_sentencepiece_vocabularies():
    from sparse_distill.teacher import whole_words

    wordpiece = ["[PAD]", "the", "##s", "film", "Film", "a", "3d", "don", "'", "great"]
    assert whole_words(wordpiece) == [("the", 1), ("film", 3), ("don", 7), ("great", 9)]
    bpe = ["<s>", "Ġthe", "Ġfilm", "ing", "ĠFilm", "Ġa", "Ġgreat", "Ġ2020", "the"]
    assert whole_words(bpe) == [("the", 1), ("film", 2), ("great", 6)]  # "the" without Ġ continues a word
    sentencepiece = ["<unk>", "▁the", "▁movie", "s", "▁Movie", "▁is"]
    assert whole_words(sentencepiece) == [("the", 1), ("movie", 2), ("is", 5)]


def test_teacher_word_vectors_are_the_input_embeddings_of_the_whole_words(tiny_teacher):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparse_distill.teacher import teacher_word_vectors

    words, vectors = teacher_word_vectors(tiny_teacher)
    vocab = AutoTokenizer.from_pretrained(str(tiny_teacher)).get_vocab()
    table = AutoModelForSequenceClassification.from_pretrained(str(tiny_teacher)).get_input_embeddings().weight
    assert words and len(words) == len(vectors) and all(w.isalpha() and len(w) > 1 for w in words)
    np.testing.assert_allclose(vectors[0], table[vocab[words[0]]].detach().numpy())


def test_input_embeddings_read_alone_equal_the_loaded_models(tiny_teacher, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    from sparse_distill.teacher import input_embeddings

    table = AutoModelForSequenceClassification.from_pretrained(str(tiny_teacher)).get_input_embeddings().weight
    expected = table.detach().numpy()
    assert np.array_equal(input_embeddings(tiny_teacher), expected)
    # A backbone's checkpoint names its weights without the task model's prefix: found all the same.
    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_teacher, backbone)
    [weights] = backbone.glob("*.safetensors")
    stored = load_file(weights)
    prefix = next(k for k in stored if k.endswith("word_embeddings.weight")).split(".", 1)[0] + "."
    save_file({k.removeprefix(prefix): v for k, v in stored.items()}, weights, metadata={"format": "pt"})
    assert np.array_equal(input_embeddings(backbone), expected)


def test_fine_tuning_logs_its_progress_between_evaluations(tiny_teacher, tiny_data, tmp_path, caplog, monkeypatch):
    import logging

    from sparse_distill import teacher
    from sparse_distill.config import TeacherConfig
    from sparse_distill.data import LabelMap, load_split

    train, dev = (load_split(str(tiny_data / f"{s}.parquet")) for s in ("train", "dev"))
    lm = LabelMap.from_values(train.labels)
    # One evaluation at the end: without the timed progress line, nothing would be logged until then.
    cfg = TeacherConfig(model=str(tiny_teacher), max_length=32, batch_size=32, epochs=1, checkpoint_every=None)
    monkeypatch.setattr(teacher, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="sparse_distill.teacher"):
        result = teacher.finetune_teacher(
            cfg, train.texts, lm.encode(train.labels), dev.texts, lm.encode(dev.labels), lm, tmp_path
        )
    lines = [r.getMessage() for r in caplog.records if "steps/s" in r.getMessage()]
    # Every step but the last (which the final evaluation reports) says where it is and how long is left.
    assert len(lines) == result.steps - 1
    assert lines[0].startswith(f"teacher step 1/{result.steps} (")
    assert "min left" in lines[-1]


def test_the_teacher_budget_comes_from_the_data_unless_epochs_are_set():
    from sparse_distill.config import TeacherConfig
    from sparse_distill.teacher import plan_teacher_budget

    cfg = TeacherConfig(model="m", batch_size=32)
    assert cfg.budget_texts == 30_000
    # A 30k sample is one pass; 12k rows get 2.5 passes; a tiny train set stops at the 5-pass cap.
    large, mid, small = (plan_teacher_budget(n, cfg) for n in (30_000, 12_000, 500))
    assert (large.epochs, large.steps) == (1.0, 938)
    assert (mid.epochs, mid.steps) == (2.5, 938)
    assert (small.epochs, small.steps) == (5.0, 80)
    assert "2.5 passes over 12,000 texts (30,000 texts seen" in mid.reason
    # Dev is scored about 6 times per budget, and never more than once a pass.
    assert (large.eval_every, mid.eval_every, small.eval_every) == (157, 157, 14)
    assert plan_teacher_budget(100_000, cfg).steps == 3125  # a large train set is passed over once, not cut
    # budget_texts moves the budget of a mid-sized train set up to the 5-pass cap.
    doubled = plan_teacher_budget(12_000, cfg.model_copy(update={"budget_texts": 60_000}))
    assert (doubled.epochs, doubled.steps) == (5.0, 1875)
    assert "(60,000 texts seen" in doubled.reason
    set_by_hand = plan_teacher_budget(12_000, cfg.model_copy(update={"epochs": 1.0, "eval_every": 50}))
    assert (set_by_hand.steps, set_by_hand.eval_every, set_by_hand.reason) == (375, 50, "epochs set")


def test_the_teacher_key_holds_budget_texts_only_where_it_sets_the_budget():
    from sparse_distill.config import TeacherConfig

    auto = TeacherConfig(model="m")
    # At its default (the budget before the field existed) it leaves the keys of cached teachers as they were.
    assert "budget_texts" not in auto.cache_dump()
    assert auto.model_copy(update={"budget_texts": 60_000}).cache_dump()["budget_texts"] == 60_000
    # With epochs set (or no fine-tuning) the field decides nothing, so it does not split the cache.
    for fixed in ({"epochs": 1.0}, {"skip_finetune": True}):
        one, other = (auto.model_copy(update={**fixed, "budget_texts": n}) for n in (30_000, 90_000))
        assert "budget_texts" not in other.cache_dump()
        assert one.cache_dump() == other.cache_dump()


def test_fine_tuning_runs_the_planned_budget_and_reports_it(tiny_teacher, tiny_data, tmp_path):
    from sparse_distill import teacher
    from sparse_distill.config import TeacherConfig
    from sparse_distill.data import LabelMap, load_split

    train, dev = (load_split(str(tiny_data / f"{s}.parquet")) for s in ("train", "dev"))
    lm = LabelMap.from_values(train.labels)
    cfg = TeacherConfig(model=str(tiny_teacher), max_length=32, batch_size=32, checkpoint_every=None)
    result = teacher.finetune_teacher(
        cfg, train.texts, lm.encode(train.labels), dev.texts, lm.encode(dev.labels), lm, tmp_path
    )
    planned = teacher.plan_teacher_budget(len(train.texts), cfg)
    assert planned.epochs == teacher.TEACHER_MAX_EPOCHS  # the tiny train set gets the most passes
    assert result.steps == planned.steps
    assert result.budget.startswith(f"{planned.steps:,} steps, dev every {planned.eval_every} (auto: ")


def test_auto_precision_is_bf16_where_the_cpu_runs_it_natively_and_fp32_elsewhere(monkeypatch):
    import torch

    from sparse_distill import teacher

    monkeypatch.setattr(teacher, "cpu_has_bf16", lambda: True)
    assert teacher._autocast_dtype("auto", "cpu") == torch.bfloat16
    assert teacher._autocast_dtype("auto", "cpu", quantize_int8=True) is None  # int8 layers run as they are
    assert teacher._autocast_dtype("fp32", "cpu") is None
    monkeypatch.setattr(teacher, "cpu_has_bf16", lambda: False)
    assert teacher._autocast_dtype("auto", "cpu") is None
    assert teacher._autocast_dtype("auto", "cuda:0") == torch.bfloat16
    assert teacher._autocast_dtype("bf16", "cpu") == torch.bfloat16


def test_auto_precision_labels_close_to_fp32(tiny_teacher):
    from sparse_distill.teacher import TeacherPredictor

    texts = ["a wonderful and moving film", "dull and tedious", "not bad at all", "the plot goes nowhere"] * 8
    exact = TeacherPredictor(tiny_teacher, max_length=16, precision="fp32").predict_proba(texts)
    auto = TeacherPredictor(tiny_teacher, max_length=16, precision="auto").predict_proba(texts)
    np.testing.assert_allclose(auto, exact, atol=0.02)


def test_head_tail_keeps_both_ends_of_a_long_text_and_leaves_short_ones_alone(tiny_teacher):
    from transformers import AutoTokenizer

    from sparse_distill.teacher import padded_inputs, tokenize

    tok = AutoTokenizer.from_pretrained(str(tiny_teacher))
    long = "great " * 10 + "the film " * 40 + "awful " * 10
    full = tok(long)["input_ids"]
    assert len(full) > 32
    head = tokenize(tok, [long], 32, "head")["input_ids"][0]
    both = tokenize(tok, [long], 32, "head_tail")["input_ids"][0]
    assert head == full[:31] + [tok.sep_token_id]  # the head alone never reaches "awful"
    assert both == full[:16] + full[-16:]  # first half with [CLS], last half with "awful" and [SEP]
    assert tok.convert_tokens_to_ids("awful") in both and tok.convert_tokens_to_ids("awful") not in head
    short = "great film"
    assert tokenize(tok, [short], 32, "head_tail") == tokenize(tok, [short], 32, "head")
    # A text far longer than the character bound is cut the same way as if tokenised whole.
    huge = "great " * 20 + "plot " * 5000 + "awful " * 20
    assert (
        tokenize(tok, [huge], 32, "head_tail")["input_ids"][0]
        == tok(huge)["input_ids"][:16] + tok(huge)["input_ids"][-16:]
    )
    batch = padded_inputs(tok, [long, short], 32, "head_tail", "cpu")
    assert batch["input_ids"].shape == (2, 32) and batch["attention_mask"][1].sum() == len(tok(short)["input_ids"])
    with pytest.raises(ValueError, match="truncation"):
        tokenize(tok, [long], 32, "tail")


def test_the_teacher_records_its_truncation_and_its_predictor_reads_it(tiny_teacher, tiny_data, tmp_path):
    from sparse_distill import teacher
    from sparse_distill.config import TeacherConfig
    from sparse_distill.data import LabelMap, load_split

    train, dev = (load_split(str(tiny_data / f"{s}.parquet")) for s in ("train", "dev"))
    lm = LabelMap.from_values(train.labels)
    assert teacher.teacher_truncation(tiny_teacher) == "head"  # a folder that does not say: as before
    cfg = TeacherConfig(model=str(tiny_teacher), max_length=16, epochs=0.1, checkpoint_every=None)
    assert cfg.truncation == "head_tail"
    result = teacher.finetune_teacher(
        cfg, train.texts, lm.encode(train.labels), dev.texts, lm.encode(dev.labels), lm, tmp_path
    )
    assert teacher.teacher_truncation(result.model_dir) == "head_tail"
    predictor = teacher.TeacherPredictor(result.model_dir, max_length=16, precision="fp32")
    assert predictor.truncation == "head_tail"
    texts = [" ".join(["the film"] * 20 + ["awful"] * 5), "great"]
    tail = predictor.predict_logits(texts)
    head = teacher.TeacherPredictor(result.model_dir, max_length=16, precision="fp32", truncation="head")
    assert not np.allclose(tail[0], head.predict_logits(texts)[0])  # the long text is read differently
    np.testing.assert_allclose(tail[1], head.predict_logits(texts)[1], rtol=1e-5)  # the short one is not


def test_auto_max_length_covers_most_texts_in_steps_of_32_within_the_cap(tiny_teacher):
    from transformers import AutoTokenizer

    from sparse_distill.teacher import LENGTH_STEP, auto_max_length, covering_length

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_teacher))
    short = ["great film", "a dull plot"] * 10
    assert covering_length(tokenizer, ["great film"]) == len(tokenizer("great film")["input_ids"])  # [CLS] .. [SEP]
    length, reason = auto_max_length(tokenizer, {"train": short, "dev": short}, cap=256)
    assert length == LENGTH_STEP and "rounded up" in reason and "of the dev texts within" in reason

    # 90% of the texts at 50 words or more: two steps of 32, set by the longer split.
    long = [" ".join(["the film was great"] * 13)] * 9 + ["dull"]
    need = covering_length(tokenizer, long)
    assert 32 < need <= 64
    assert auto_max_length(tokenizer, {"train": short, "dev": long}, cap=256)[0] == 64
    # A tenth of long outliers does not set the length.
    assert auto_max_length(tokenizer, {"train": short[:18] + long[:2]}, cap=256)[0] == LENGTH_STEP

    # Documents past the cap: the cap, and the reason says texts are cut.
    docs = [" ".join(["the film was great and the plot was dull"] * 100)] * 5
    length, reason = auto_max_length(tokenizer, {"train": docs}, cap=128)
    assert length == 128 and "more than 128" in reason and "max_length_cap 128" in reason


def test_a_mean_pooled_teacher_reads_the_mean_of_its_tokens_and_its_predictor_loads_it(
    tiny_teacher, tiny_data, tmp_path
):
    import torch

    from sparse_distill import teacher
    from sparse_distill.config import TeacherConfig
    from sparse_distill.data import LabelMap, load_split

    train, dev = (load_split(str(tiny_data / f"{s}.parquet")) for s in ("train", "dev"))
    lm = LabelMap.from_values(train.labels)
    cfg = TeacherConfig(model=str(tiny_teacher), max_length=16, epochs=0.1, checkpoint_every=None)
    assert cfg.pooling == "auto"
    result = teacher.finetune_teacher(
        cfg, train.texts, lm.encode(train.labels), dev.texts, lm.encode(dev.labels), lm, tmp_path
    )
    assert teacher.training_info(result.model_dir)["pooling"] == "mean"  # a BERT: auto chose the mean
    predictor = teacher.TeacherPredictor(result.model_dir, max_length=16, precision="fp32")
    model = predictor.model
    assert isinstance(model.base_model.pooler, teacher.MaskedMeanPooler)
    # The logits are the classifier on the mean of the text's own token states: padding changes nothing.
    texts = ["great film", "the film was long and dull and awful"]
    logits = predictor.predict_logits(texts)
    for text, row in zip(texts, logits, strict=True):
        enc = predictor.tokenizer([text], return_tensors="pt")
        with torch.inference_mode():
            hidden = model.base_model(**enc).last_hidden_state
            expected = model.classifier(hidden.mean(1))
        np.testing.assert_allclose(row, expected[0].numpy(), rtol=1e-4, atol=1e-5)
    # Used as it is (skip_finetune), the checkpoint keeps the head it was trained with.
    again = teacher.finetune_teacher(
        cfg.model_copy(update={"model": result.model_dir, "skip_finetune": True, "pooling": "model"}),
        train.texts,
        lm.encode(train.labels),
        dev.texts,
        lm.encode(dev.labels),
        lm,
        tmp_path / "as-is",
    )
    assert teacher.training_info(again.model_dir)["pooling"] == "mean"
    assert again.dev_accuracy == result.dev_accuracy
    reloaded = teacher.TeacherPredictor(again.model_dir, max_length=16, precision="fp32")
    np.testing.assert_allclose(reloaded.predict_logits(texts), logits, rtol=1e-5)
    # int8 quantisation copies the model: the copy's pooler gets the mask too.
    quantized = teacher.TeacherPredictor(result.model_dir, max_length=16, quantize_int8=True)
    assert quantized.model.base_model.pooler is not model.base_model.pooler
    quantized.predict_logits(texts)
    mask = quantized.model.base_model.pooler.mask
    assert mask is not None and mask.shape[0] == 2 and mask.sum(1).tolist() != [mask.shape[1]] * 2


def test_the_model_s_own_head_is_kept_where_asked_or_where_there_is_no_pooler(tiny_teacher, tiny_data, tmp_path):
    from sparse_distill import teacher
    from sparse_distill.config import TeacherConfig
    from sparse_distill.data import LabelMap, load_split

    train, dev = (load_split(str(tiny_data / f"{s}.parquet")) for s in ("train", "dev"))
    lm = LabelMap.from_values(train.labels)
    cfg = TeacherConfig(model=str(tiny_teacher), max_length=16, epochs=0.1, checkpoint_every=None, pooling="model")
    result = teacher.finetune_teacher(
        cfg, train.texts, lm.encode(train.labels), dev.texts, lm.encode(dev.labels), lm, tmp_path
    )
    assert teacher.training_info(result.model_dir)["pooling"] == "model"
    model = teacher.TeacherPredictor(result.model_dir, max_length=16).model
    assert not isinstance(model.base_model.pooler, teacher.MaskedMeanPooler)
    model.base_model.pooler = None  # as a RoBERTa's classifier, which reads the first token's state
    assert teacher.resolve_pooling("auto", model) == "model"
    with pytest.raises(ValueError, match="teacher.pooling mean needs a model whose classifier reads a BERT-style"):
        teacher.resolve_pooling("mean", model)
