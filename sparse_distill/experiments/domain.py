"""Domain adaptation: a teacher fine-tuned on a source task labels the target corpus; the student distilled from
those labels is then fine-tuned on the target task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparse_distill.config import LabelJob, load_config
from sparse_distill.data import DataError
from sparse_distill.experiments.base import (
    BaseRun,
    Context,
    gold_source,
    model_row,
    score_student,
    teacher_row,
    train_dan,
)
from sparse_distill.labelling import run_label_job
from sparse_distill.pipeline import corpus_paths
from sparse_distill.run_store import label_dir_fingerprint
from sparse_distill.student import DanStudent, load_student
from sparse_distill.training import SoftLabelStream


def run_domain(ctx: Context) -> list[dict[str, Any]]:
    """Source teacher labels the target corpus; KD; fine-tune on the target train set, with and without fresh dense
    layers; against the student trained on the target alone."""
    dcfg, base = ctx.config.domain, ctx.base
    if not dcfg.source_pipeline:
        raise DataError("domain.source_pipeline is not set: name the source task's pipeline config")
    if not base.config.data.corpus:
        raise DataError(f"{base.config.name}: the domain experiment needs a target corpus (data.corpus is empty)")
    overrides = [f"data.data_dir={dcfg.source_data_dir}"] if dcfg.source_data_dir else []
    source_cfg = load_config(dcfg.source_pipeline, overrides)
    source = BaseRun.from_run_dir(source_cfg, dcfg.source_run_dir or Path("runs") / source_cfg.name)
    max_length = dcfg.label_max_length or source.config.teacher.max_length  # as the source run chose it
    rows = [
        teacher_row(ctx, f"Teacher ({source_cfg.name}, no adaptation)", source.teacher_dir, max_length),
        teacher_row(ctx, f"Teacher ({base.config.name})"),
    ]
    # The source teacher's soft labels on the target corpus (the labelling job: sharded and resumable).
    label_dir = ctx.out_dir / "domain-labels"
    cfg = base.config
    job = LabelJob(
        teacher=source.teacher_dir,
        corpus=corpus_paths(cfg.data),
        out=str(label_dir),
        text_column=cfg.data.text_column,
        id_column=cfg.data.id_column,
        limit=dcfg.corpus_limit,
        max_length=max_length,
        replan=True,
        label=cfg.label.model_copy(update={"max_length": max_length}),
    )
    status = run_label_job(job)
    if status["failed"]:
        raise DataError(f"{label_dir}: {status['failed']} shards failed to label; see `sparse-distill label-status`")
    train = ctx.train_cfg
    kd = train_dan(
        ctx,
        "domain-kd",
        lambda: SoftLabelStream([str(label_dir)], train.shuffle_buffer, train.seed),
        label_dir_fingerprint(str(label_dir)),
        base.vocab_dir,
    )
    rows.append(model_row(f"DAN, KD from the {source_cfg.name} teacher (no target labels)", kd))
    gold, gold_fp = gold_source(ctx)
    for reinit in (False, True):
        name = "domain-kd-ft-reinit" if reinit else "domain-kd-ft"

        def init(model: DanStudent, reinit: bool = reinit) -> None:
            trained, _ = load_student(kd["model_dir"], mmap=False)
            state = trained.state_dict()
            if reinit:
                # Keep the n-gram table only: the dense layers start afresh for the target task.
                state = {k: v for k, v in state.items() if k.startswith("embedding.")}
            model.load_state_dict(state, strict=not reinit)

        r = train_dan(
            ctx,
            name,
            gold,
            gold_fp,
            base.vocab_dir,
            train=dcfg.finetune,
            init=init,
            init_fp=[kd["fingerprint"], reinit],
        )
        rows.append(model_row("DAN, KD + FT on target" + (" (dense layers re-initialised)" if reinit else ""), r))
    if "scratch" in base.students:
        rows.append(model_row("DAN trained on the target alone", score_student(ctx, base.students["scratch"])))
    else:
        r = train_dan(ctx, "domain-target-only", gold, gold_fp, base.vocab_dir, train=cfg.scratch)
        rows.append(model_row("DAN trained on the target alone", r))
    return rows
