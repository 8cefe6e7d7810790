"""The transfer set stage: how many texts (`pipeline.transfer_size`), and `pipeline.run_transfer` on a tiny task
(transfer.parquet from the train texts, no teacher needed)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_distill.config import PipelineConfig, TransferConfig
from sparse_distill.pipeline import run_transfer, stage_fingerprints, transfer_size

WORDS = ["the", "film", "plot", "was", "great", "dull", "and", "really", "fun", "boring", "actors", "a"]


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def _write(path, n: int, seed: int, labelled: bool = True) -> None:
    cols = {"id": [f"{path.stem}{i}" for i in range(n)], "text": _texts(n, seed)}
    if labelled:
        cols["label"] = ["pos" if i % 2 else "neg" for i in range(n)]
    pq.write_table(pa.table(cols), path)


def _config(
    tmp_path, transfer: dict | None = None, corpus_rows: int = 0, teacher: Path | None = None, **data
) -> PipelineConfig:
    d = tmp_path / "data"
    if not d.exists():
        d.mkdir()
        _write(d / "train.parquet", 20, 1)
        _write(d / "dev.parquet", 10, 2)
    corpus = []
    if corpus_rows:
        _write(d / "corpus.parquet", corpus_rows, 4, labelled=False)
        corpus = ["corpus.parquet"]
    return PipelineConfig.model_validate(
        {
            "data": {"data_dir": str(d), "train": "train.parquet", "dev": "dev.parquet", "corpus": corpus, **data},
            # Without the neighbour method run_transfer never loads the teacher (tests of it give one).
            "teacher": {"model": str(teacher or tmp_path / "no-teacher-here")},
            # Copies per train row only (no floor of documents), unless a test sets it.
            "transfer": {
                "methods": ["eda", "ngram", "dropout", "mix"],
                "teacher_words": False,
                "min_documents": 0,
                **(transfer or {}),
            },
        }
    )


def _train_words(n: int = 20) -> set[str]:
    return {w for t in _texts(20, 1)[:n] for w in t.split()}


# --- transfer_size ---------------------------------------------------------------------------------------------------


def test_an_explicit_size_wins(tmp_path):
    cfg = _config(tmp_path, {"size": 5})
    assert transfer_size(cfg, 100, 0) == (5, "transfer.size set")
    assert transfer_size(cfg, 100, 10**9) == (5, "transfer.size set")  # even beside a huge corpus
    zero = _config(tmp_path, {"size": 0})
    assert transfer_size(zero, 100, 0) == (0, "transfer.size set")  # 0: no transfer set, even with no corpus


def test_auto_without_a_corpus_is_copies_per_train_row_capped_at_max_size(tmp_path):
    cfg = _config(tmp_path, {"copies_per_text": 3, "max_size": 1000})
    size, reason = transfer_size(cfg, 100, 0)
    assert size == 300 and reason.startswith("auto")
    size, reason = transfer_size(cfg, 400, 0)
    assert size == 1000 and "max_size" in reason and "1,000" in reason
    assert transfer_size(cfg, 0, 0)[0] == 0
    default = PipelineConfig.model_validate({**_config(tmp_path).model_dump(), "transfer": TransferConfig()})
    assert transfer_size(default, 100_000, 0)[0] == TransferConfig().max_size  # the defaults: capped ...
    assert transfer_size(default, 10_000, 0)[0] == TransferConfig().copies_per_text * 10_000
    assert transfer_size(default, 1_000, 0)[0] == TransferConfig().min_documents  # ... with a floor


def test_auto_wants_at_least_min_documents_however_few_the_train_rows(tmp_path):
    cfg = _config(tmp_path, {"copies_per_text": 3, "max_size": 1000, "min_documents": 500})
    size, reason = transfer_size(cfg, 100, 0)
    assert size == 500 and "at least transfer.min_documents 500" in reason
    assert transfer_size(cfg, 100, 200)[0] == 300  # the corpus counts towards it
    assert transfer_size(cfg, 200, 0)[0] == 600  # copies per row above the floor: the floor plays no part
    assert "min_documents" not in transfer_size(cfg, 200, 0)[1]
    assert transfer_size(cfg, 0, 0)[0] == 0  # no train rows, nothing to make texts from


def test_auto_beside_a_big_corpus_is_empty(tmp_path):
    cfg = _config(tmp_path, {"copies_per_text": 3, "max_size": 1000})
    size, reason = transfer_size(cfg, 100, 10**7)
    assert size == 0 and reason.startswith("auto") and "10,000,000" in reason


def test_auto_size_tops_the_corpus_up_to_copies_per_train_row(tmp_path):
    cfg = _config(tmp_path, {"copies_per_text": 3, "max_size": 1000})
    assert transfer_size(cfg, 100, 120)[0] == 180  # 300 documents wanted, 120 in the corpus
    assert transfer_size(cfg, 100, 299)[0] == 1
    assert transfer_size(cfg, 100, 300)[0] == 0
    assert transfer_size(cfg, 1000, 1500)[0] == 1000  # 1500 short, capped at max_size
    assert "120" in transfer_size(cfg, 100, 120)[1]


# --- run_transfer ----------------------------------------------------------------------------------------------------


def _read(path) -> tuple[list[str], list[str], list[str]]:
    table = pq.read_table(path)
    return table.column_names, table.column("id").to_pylist(), table.column("text").to_pylist()


def test_run_transfer_writes_the_texts_from_the_train_set(tmp_path):
    cfg = _config(tmp_path, {"copies_per_text": 3})
    out = tmp_path / "transfer"
    out.mkdir()
    rec = run_transfer(cfg, out)
    assert rec["rows"] == 60 and rec["reason"].startswith("auto")
    assert rec["path"] == str(out / "transfer.parquet")
    columns, ids, texts = _read(rec["path"])
    assert columns == ["id", "text", "source_rows", "source_shares"]
    assert len(ids) == len(set(ids)) == len(texts) == 60
    assert all(t.strip() for t in texts) and {w for t in texts for w in t.split()} <= _train_words()
    again = tmp_path / "again"
    again.mkdir()
    assert _read(run_transfer(cfg, again)["path"]) == (columns, ids, texts)  # seeded: the same set
    other = _config(tmp_path, {"copies_per_text": 3, "seed": 99})
    assert _read(run_transfer(other, again)["path"])[2] != texts


def test_each_transfer_text_names_the_train_rows_it_was_made_from(tmp_path):
    # The rows let the train rows' gold labels follow their copies into distillation (pipeline.gold_targets).
    cfg = _config(tmp_path, {"copies_per_text": 3})
    out = tmp_path / "transfer"
    out.mkdir()
    table = pq.read_table(run_transfer(cfg, out)["path"])
    train = _texts(20, 1)
    mixes = 0
    columns = (table.column(c).to_pylist() for c in ("text", "source_rows", "source_shares"))
    for text, rows, shares in zip(*columns, strict=True):
        assert 1 <= len(rows) <= 2 and all(0 <= r < 20 for r in rows)
        assert abs(sum(shares) - 1) < 1e-6 and all(w > 0 for w in shares)
        words = text.split()
        if len(rows) == 1:  # EDA may bring a word of another train text; the others keep to their own text's words
            assert len(set(words) - set(train[rows[0]].split())) <= max(1, round(0.1 * len(words)))
        else:  # a mix: a head of the first text, then a tail of the second, shares by their words
            mixes += 1
            head = round(shares[0] * len(words))
            assert words[:head] == train[rows[0]].split()[:head]
            assert words[head:] == train[rows[1]].split()[len(train[rows[1]].split()) - (len(words) - head) :]
    assert mixes > 0


def test_run_transfer_explicit_sizes_and_methods(tmp_path):
    out = tmp_path / "transfer"
    out.mkdir()
    rec = run_transfer(_config(tmp_path, {"size": 7, "methods": ["ngram"]}), out)
    assert rec["rows"] == 7 and rec["reason"] == "transfer.size set"
    train = [t.split() for t in _texts(20, 1)]
    for text in _read(rec["path"])[2]:  # ngram only: contiguous spans of train texts
        span = text.split()
        assert any(words[i : i + len(span)] == span for words in train for i in range(len(words))), text
    rec = run_transfer(_config(tmp_path, {"size": 0}), out)
    assert rec["rows"] == 0 and _read(rec["path"])[1:] == ([], [])  # an empty file, still readable


def test_run_transfer_uses_only_the_first_max_train_samples_rows(tmp_path):
    out = tmp_path / "transfer"
    out.mkdir()
    rec = run_transfer(_config(tmp_path, {"copies_per_text": 2}, max_train_samples=3), out)
    assert rec["rows"] == 6
    assert {w for t in _read(rec["path"])[2] for w in t.split()} <= _train_words(3)


def test_run_transfer_counts_the_corpus(tmp_path):
    out = tmp_path / "transfer"
    out.mkdir()
    # 40 corpus documents against 2 x 20 wanted (and, with a threshold, a threshold of 40): no transfer set.
    transfer = {"copies_per_text": 2}
    rec = run_transfer(_config(tmp_path, transfer, corpus_rows=40), out)
    assert rec["rows"] == 0 and "40" in rec["reason"] and _read(rec["path"])[1] == []
    # Only the first max_corpus_samples documents count.
    rec = run_transfer(_config(tmp_path, transfer, corpus_rows=40, max_corpus_samples=10), out)
    assert rec["rows"] == 30 and len(_read(rec["path"])[1]) == rec["rows"]
    assert "10" in rec["reason"]


def test_run_transfer_neighbour_replacement_brings_the_teachers_words(tmp_path):
    from sparse_distill.testing import make_tiny_teacher

    # The teacher's tokenizer knows words the train set lacks; neighbour replacement brings some of them in.
    extra = ["superb", "awful", "movie", "script", "lovely", "tedious", "cast", "scenes"]
    teacher = make_tiny_teacher(tmp_path / "teacher", [" ".join(WORDS + extra)] * 50, vocab_size=120)
    out = tmp_path / "transfer"
    out.mkdir()
    cfg = _config(tmp_path, {"size": 200, "methods": ["neighbour"], "replace_rate": 0.5}, teacher=teacher)
    rec = run_transfer(cfg, out)
    texts = _read(rec["path"])[2]
    new = {w for t in texts for w in t.split()} - _train_words()
    assert rec["rows"] == 200 and new and new <= set(extra) | set(WORDS) | _teacher_words(teacher)
    assert texts == _read(run_transfer(cfg, tmp_path / "again")["path"])[2]  # seeded

    # teacher_words: every whole word of the teacher's tokenizer follows as a one-word text, with its own id.
    words = _teacher_words(teacher)
    cfg = _config(tmp_path, {"size": 20, "methods": ["ngram"], "teacher_words": True}, teacher=teacher)
    rec = run_transfer(cfg, out)
    _, ids, texts = _read(rec["path"])
    assert rec["rows"] == 20 + len(words) and set(extra) <= words and "whole words" in rec["reason"]
    assert set(texts[20:]) == words and ids[20:] == [f"word:{w}" for w in texts[20:]]
    assert run_transfer(_config(tmp_path, {"size": 0, "teacher_words": True}, teacher=teacher), out)["rows"] == 0


def _teacher_words(teacher: Path) -> set[str]:
    """The teacher tokenizer's whole words (alphabetic, 2+ letters), as neighbour replacement may bring them."""
    from sparse_distill.teacher import teacher_word_vectors

    return set(teacher_word_vectors(teacher)[0])


def test_the_vocabulary_takes_the_transfer_sets_new_words_after_the_counted_ngrams(tmp_path):
    from sparse_distill.pipeline import run_choices, run_vocab, vocab_sources
    from sparse_distill.vocab import NgramVocab

    cfg = _config(tmp_path, {"size": 7, "methods": ["ngram"]})
    out = tmp_path / "transfer"
    out.mkdir()
    rec = run_transfer(cfg, out)
    assert [s.path for s in vocab_sources(cfg)] == [str(tmp_path / "data" / "train.parquet")]  # counted: train only
    plain = run_vocab(cfg, tmp_path / "plain")
    counted = NgramVocab.load(tmp_path / "plain")
    # A transfer set with three new tokens (one twice, one a mark, one already known): after the counted n-grams.
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["zebra film; Quartz", "zebra the plot"]}), rec["path"])
    res = run_vocab(cfg, tmp_path / "vocab", rec)
    vocab = NgramVocab.load(tmp_path / "vocab")
    assert res["transfer_words"] == 3 and res["size"] == plain["size"] + 3 == len(vocab.ngrams)
    assert vocab.ngrams == counted.ngrams + [";", "quartz", "zebra"] and list(vocab.counts[-3:]) == [0, 0, 0]
    ids, _ = vocab.featurize(["zebra quartz film"])
    assert set(ids) >= {len(counted.ngrams) + 1, len(counted.ngrams) + 2}  # featurised with their new rows
    assert run_vocab(cfg, tmp_path / "vocab", rec)["size"] == res["size"]  # again: selected anew, words added once
    assert run_vocab(cfg, tmp_path / "vocab", {**rec, "rows": 0})["transfer_words"] == 0
    run_dir = tmp_path / "run"
    (run_dir / "vocab").mkdir(parents=True)
    (run_dir / "vocab" / "result.json").write_text(json.dumps(res))
    table = run_choices(cfg, run_dir)["table"]
    assert "plus 3 words of the transfer set" in table
    assert f"|V| = {res['size'] + 200_000:,}" in table and "200,000 rows for the words' character 4-grams" in table
    assert vocab.subwords is not None and len(vocab) == res["size"] + 200_000


def _background(path: Path, n: int) -> Path:
    sentences = [f"sentence {i} about the weather and zebras number {i % 7}" for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": sentences}), path)
    return path


def test_background_sentences_follow_the_made_texts_with_teachers_labels_only(tmp_path):
    from sparse_distill.pipeline import run_choices, run_vocab, vocab_sources

    bg = _background(tmp_path / "bg.parquet", 500)
    out = tmp_path / "transfer"
    out.mkdir()
    # auto size: the distillation documents wanted (8 per train row = 160) less the corpus's (50), at most the file's.
    cfg = _config(tmp_path, {"size": 30, "methods": ["ngram"], "background": str(bg)}, corpus_rows=50)
    rec = run_transfer(cfg, out)
    table = pq.read_table(rec["path"])
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    assert rec["rows"] == 30 + 110 and rec["background"] == 110 and rec["background_path"] == str(bg)
    assert (
        ids[30:] == [f"background:{i}" for i in range(110)]
        and texts[30:] == pq.read_table(bg).column("text").to_pylist()[:110]
    )
    assert table.column("source_rows").to_pylist()[30:] == [[]] * 110  # no train row: the teacher's labels alone
    assert "110 background sentences" in rec["reason"] and "corpus's 50" in rec["reason"]
    # The vocabulary counts them like a corpus (their first 110 rows), and takes their n-grams.
    assert vocab_sources(cfg, rec)[-1].path == str(bg) and vocab_sources(cfg, rec)[-1].limit == 110
    run_vocab(cfg, tmp_path / "vocab", rec)
    assert _has_ngram(tmp_path / "vocab")
    run_dir = tmp_path / "run"
    (run_dir / "transfer").mkdir(parents=True)
    (run_dir / "transfer" / "result.json").write_text(json.dumps(rec))
    assert "110 background sentences" in run_choices(cfg, run_dir)["transfer"]
    # An explicit size takes the file's first rows; a big corpus leaves no room in auto.
    assert (
        run_transfer(_config(tmp_path, {"size": 5, "background": str(bg), "background_size": 7}), out)["background"]
        == 7
    )
    assert run_transfer(_config(tmp_path, {"size": 5, "background": str(bg)}, corpus_rows=400), out)["background"] == 0
    # No transfer set, no background: transfer.size 0 turns both off.
    assert run_transfer(_config(tmp_path, {"size": 0, "background": str(bg)}), out)["rows"] == 0


def _has_ngram(vocab_dir: Path) -> bool:
    from sparse_distill.vocab import NgramVocab

    return "zebras number" in NgramVocab.load(vocab_dir).ngrams


def test_background_auto_reads_the_demo_file_and_a_missing_explicit_file_is_an_error(tmp_path, monkeypatch):
    from sparse_distill.data import DataError
    from sparse_distill.pipeline import BACKGROUND_ENV, background_path, background_size

    cfg = _config(tmp_path, {"size": 5})
    assert cfg.transfer.background == "auto"
    monkeypatch.setenv(BACKGROUND_ENV, str(tmp_path / "none-here.parquet"))
    assert background_path(cfg) is None
    assert "not made by `make install` or demo-data" in background_size(cfg, 20, 0).reason
    bg = _background(tmp_path / "bg.parquet", 10)
    monkeypatch.setenv(BACKGROUND_ENV, str(bg))
    assert background_path(cfg) == str(bg) and background_size(cfg, 20, 0)[:2] == (10, str(bg))
    assert background_path(_config(tmp_path, {"size": 5, "background": None})) is None
    with pytest.raises(DataError, match="transfer.background: .*nowhere.parquet is not a file"):
        background_path(_config(tmp_path, {"size": 5, "background": str(tmp_path / "nowhere.parquet")}))
    pq.write_table(pa.table({"sentence": ["a b c"]}), tmp_path / "wrong.parquet")
    with pytest.raises(DataError, match="wrong.parquet is not a Parquet file with a `text` column"):
        background_size(_config(tmp_path, {"size": 5, "background": str(tmp_path / "wrong.parquet")}), 20, 0)


def test_background_auto_falls_back_to_the_checkout_from_another_working_folder(tmp_path, monkeypatch):
    from sparse_distill import pipeline

    monkeypatch.delenv(pipeline.BACKGROUND_ENV)
    checkout = tmp_path / "checkout"
    monkeypatch.setattr(pipeline, "_CHECKOUT", checkout)
    monkeypatch.chdir(tmp_path)
    # Neither file: the working folder's name, for the summary's "not made" reason.
    assert pipeline.auto_background_file() == pipeline.BACKGROUND_FILE
    _background(checkout / pipeline.BACKGROUND_FILE, 3)
    assert pipeline.auto_background_file() == checkout / pipeline.BACKGROUND_FILE
    # The working folder's own file comes first.
    _background(tmp_path / pipeline.BACKGROUND_FILE, 4)
    assert pipeline.auto_background_file() == pipeline.BACKGROUND_FILE


def test_background_sentences_key_the_transfer_set_by_their_content(tmp_path, monkeypatch):
    from sparse_distill.pipeline import BACKGROUND_ENV

    monkeypatch.setenv(BACKGROUND_ENV, str(tmp_path / "none-here.parquet"))
    off = stage_fingerprints(_config(tmp_path, {"background": None}))
    # auto without the file is the behaviour before background sentences existed: the same keys.
    assert stage_fingerprints(_config(tmp_path)) == off
    bg = _background(tmp_path / "bg.parquet", 10)
    on = stage_fingerprints(_config(tmp_path, {"background": str(bg)}))
    assert on["transfer"] != off["transfer"] and on["vocab"] != off["vocab"] and on["teacher"] == off["teacher"]
    monkeypatch.setenv(BACKGROUND_ENV, str(bg))
    assert stage_fingerprints(_config(tmp_path))["transfer"] == on["transfer"]  # auto finds the same file
    _background(bg, 11)
    assert stage_fingerprints(_config(tmp_path))["transfer"] != on["transfer"]  # by content


# --- cache keys ------------------------------------------------------------------------------------------------------


def test_the_transfer_config_reaches_the_transfer_stages_the_vocabulary_and_the_students_only(tmp_path):
    cfg = _config(tmp_path)
    fps = stage_fingerprints(cfg)
    assert {"transfer", "label_transfer"} <= set(fps)
    other = stage_fingerprints(_config(tmp_path, {"methods": ["ngram", "mix"]}))
    changed = {k for k in fps if fps[k] != other[k]}
    # The vocabulary is counted over the transfer set, so it and every student follow it.
    assert {"transfer", "label_transfer", "vocab", "distill", "kdft", "scratch", "evaluate"} <= changed
    assert not changed & {"teacher", "label_train", "label_corpus"}
    # With transfer.size 0 there is no transfer set: its settings stay out of distillation's key.
    off = stage_fingerprints(_config(tmp_path, {"size": 0}))
    off_other = stage_fingerprints(_config(tmp_path, {"size": 0, "methods": ["ngram"]}))
    assert off["distill"] != fps["distill"] and off_other["distill"] == off["distill"]


def test_neighbour_replacement_keys_the_transfer_set_by_the_teachers_backbone_only(tmp_path):
    def fps(teacher: dict, methods: list[str]) -> dict[str, str]:
        cfg = _config(tmp_path, {"methods": methods})
        return stage_fingerprints(cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update=teacher)}))

    base = fps({}, ["neighbour"])
    assert fps({"lr": 3e-5}, ["neighbour"])["transfer"] == base["transfer"]  # not the fine-tuning settings
    assert fps({"model": "another/backbone"}, ["neighbour"])["transfer"] != base["transfer"]
    assert fps({"model": "another/backbone"}, ["eda"])["transfer"] == fps({}, ["eda"])["transfer"]
    with_words = _config(tmp_path, {"methods": ["eda"], "teacher_words": True})
    other_teacher = with_words.model_copy(update={"teacher": with_words.teacher.model_copy(update={"model": "x/y"})})
    assert stage_fingerprints(with_words)["transfer"] != stage_fingerprints(other_teacher)["transfer"]


# --- the second round ------------------------------------------------------------------------------------------------


def test_the_second_round_is_as_large_as_the_transfer_sets_generated_texts_unless_set(tmp_path):
    from sparse_distill.pipeline import hard_transfer_size

    cfg = _config(tmp_path, {"copies_per_text": 3})
    assert hard_transfer_size(cfg, 100, 0) == (300, "auto: as many as the transfer set's 300 generated texts")
    assert hard_transfer_size(cfg, 100, 10**6)[0] == 0  # a corpus large enough: no transfer set, no second round
    explicit = _config(tmp_path, {"copies_per_text": 3, "hard_size": 7})
    assert hard_transfer_size(explicit, 100, 0) == (7, "transfer.hard_size set")
    off = _config(tmp_path, {"size": 0, "hard_size": 7})
    assert hard_transfer_size(off, 100, 0)[0] == 0  # no transfer set at all: the second round has nothing to follow


def test_class_margins_and_the_least_sure_texts():
    import numpy as np

    from sparse_distill.pipeline import _least_sure, class_margins

    probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6]], np.float32)
    np.testing.assert_allclose(class_margins(probs), [0.85, 0.05, 0.1, 0.4], atol=1e-6)
    assert _least_sure(class_margins(probs), 2).tolist() == [1, 2]  # the two smallest margins, in their order
    assert _least_sure(class_margins(probs[:1]), 2).tolist() == [0]  # fewer than asked: all kept


def test_the_second_rounds_settings_count_in_its_own_stage_and_later_ones_only(tmp_path):
    cfg = _config(tmp_path)
    fps = stage_fingerprints(cfg)
    for change in ({"hard_pool": 4}, {"hard_size": 10}, {"hard_share": 1.0}):
        other = stage_fingerprints(_config(tmp_path, change))
        changed = {s for s in fps if fps[s] != other[s]}
        assert changed == {"transfer_hard", "label_transfer_hard", "distill", "kdft", "evaluate"}
    # Turned off, the distill stage no longer reads its labels.
    off = stage_fingerprints(_config(tmp_path, {"hard_size": 0}))
    assert off["distill"] != fps["distill"] and off["transfer"] == fps["transfer"] and off["vocab"] == fps["vocab"]
    # The probe trains like the KD student: a distillation setting counts in the second round too.
    lr = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"lr": 0.5})})
    assert stage_fingerprints(lr)["transfer_hard"] != fps["transfer_hard"]


# --- transfer files from before their texts kept their train rows ---------------------------------------------------


def _gold(cfg, path):
    from sparse_distill.pipeline import _transfer_gold

    return _transfer_gold(cfg, path, np.eye(2, dtype=np.float32)[[i % 2 for i in range(20)]])


def test_an_older_transfer_file_gets_its_train_rows_by_making_its_texts_again(tmp_path, caplog):
    cfg = _config(tmp_path, {"copies_per_text": 3})
    out = tmp_path / "transfer"
    out.mkdir()
    path = Path(run_transfer(cfg, out)["path"])
    ids, targets = _gold(cfg, path)
    older = tmp_path / "older" / "transfer.parquet"
    older.parent.mkdir()
    pq.write_table(pq.read_table(path, columns=["id", "text"]), older)
    again = _gold(cfg, older)
    assert again[0] == ids and np.array_equal(again[1], targets)
    # A text that the config no longer makes: no gold targets, and a warning says why.
    table = pq.read_table(older)
    texts = table.column("text").to_pylist()
    pq.write_table(pa.table({"id": ids, "text": [texts[0] + " changed", *texts[1:]]}), older)
    assert _gold(cfg, older) is None
    assert "making it again does not give its texts" in caplog.text


def test_an_older_second_round_finds_its_texts_among_the_candidates_made_again(tmp_path):
    from sparse_distill.augment import make_transfer_copies
    from sparse_distill.pipeline import transfer_table

    cfg = _config(tmp_path)
    t = cfg.transfer
    train = _texts(20, 1)
    made = make_transfer_copies(train, 50, t.methods, t.seed + 1, t.alpha, t.dropout)
    keep = [3, 10, 7, 41]
    ids = ["hard:0", "hard:1", "random:0", "random:1"]
    full = tmp_path / "full" / "transfer.parquet"
    full.parent.mkdir()
    pq.write_table(transfer_table(ids, [made.texts[i] for i in keep], [made.origins[i] for i in keep]), full)
    older = tmp_path / "transfer_hard" / "transfer.parquet"
    older.parent.mkdir()
    pq.write_table(pa.table({"id": ids, "text": [made.texts[i] for i in keep]}), older)
    (older.parent / "result.json").write_text(json.dumps({"candidates": 50}))
    expected = _gold(cfg, full)
    again = _gold(cfg, older)
    assert again[0] == expected[0] == ids
    # A text made twice from different rows takes the first maker's rows, so compare with the first of each text.
    first = {}
    for text, origin in zip(made.texts, made.origins, strict=True):
        first.setdefault(text, origin)
    assert all(first[made.texts[i]] == made.origins[i] for i in keep)
    np.testing.assert_allclose(again[1], expected[1], atol=1e-6)
