"""A tiny random teacher for tests and benchmarks: no download, builds in a second."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def make_tiny_teacher(out_dir: str | Path, texts: Iterable[str], vocab_size: int = 200, num_labels: int = 2) -> Path:
    """A random 1-layer BERT sequence classifier with a WordPiece tokenizer trained on `texts`, saved to `out_dir`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    cfg = BertConfig(
        vocab_size=fast.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    out_dir = Path(out_dir)
    BertForSequenceClassification(cfg).save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def make_labelled_shards(
    out_dir: str | Path,
    texts: list[str],
    shard_size: int,
    num_classes: int = 3,
    seed: int = 0,
    columns: dict[str, list] | None = None,
) -> Path:
    """A finished labelling folder without a teacher: `texts` (and any other `columns`) written to
    `<out_dir>.parquet`, planned into shards of `shard_size` and each shard given random soft labels and a 'done'
    record, as the labelling job leaves them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparse_distill.data import file_checksum
    from sparse_distill.shard_plan import CorpusSource, open_plan, write_record
    from sparse_distill.soft_labels import LABELLING, SHARDS, LabelRecord, write_soft_labels

    out = Path(out_dir)
    corpus = out.with_suffix(".parquet")
    pq.write_table(pa.table({"text": texts, **(columns or {})}), corpus)
    plan = open_plan(out, LABELLING, [CorpusSource(str(corpus))], shard_size)
    rng = np.random.default_rng(seed)
    for shard in plan.shards:
        ids = [f"{corpus.name}:{i}" for i in range(shard.start, shard.stop)]
        path = write_soft_labels(out / SHARDS / shard.name, ids, rng.normal(size=(shard.size, num_classes)))
        record = LabelRecord(**vars(shard.spec()), status="done", rows=shard.size, checksum=file_checksum(path))
        write_record(out, LABELLING, record)
    return out
