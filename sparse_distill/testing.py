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
