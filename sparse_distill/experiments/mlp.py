"""The blog's small MLP over words (|V| ~ 5k, embedding 16, one hidden layer), with and without distillation."""

from __future__ import annotations

from typing import Any

from sparse_distill.experiments.base import Context, model_row, teacher_row
from sparse_distill.experiments.baselines import distill_targets, one_hot, word_student


def run_mlp(ctx: Context) -> list[dict[str, Any]]:
    """The blog's small MLP over words (|V| ~ 5k, embedding 16, one hidden layer), with and without distillation."""
    mcfg, d = ctx.config.mlp, ctx.data
    kwargs = {"dim": mcfg.dim, "hidden": mcfg.hidden}
    gold = one_hot(d.encoded(d.train), d.label_map.num_classes)
    rows = [teacher_row(ctx)]
    r = word_student(
        ctx, "mlp-gold", "mlp", d.train.texts, gold, d.train.source, mcfg.word_vocab, mcfg.max_len, mcfg.train, kwargs
    )
    rows.append(model_row("MLP, gold train labels", r))
    texts, probs, targets_fp = distill_targets(ctx)
    r = word_student(ctx, "mlp-kd", "mlp", texts, probs, targets_fp, mcfg.word_vocab, mcfg.max_len, mcfg.train, kwargs)
    rows.append(model_row("MLP, KD (teacher's soft labels)", r))
    return rows
