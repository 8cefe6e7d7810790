"""Featurising labelled shards as a Prefect flow: the shards still to do fanned out over a task runner."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.fanout import Progress, fan_out
from tasks import featurizing as t


class FeaturizingFailed(RuntimeError):
    """Some shards failed after their retries; the others are featurised and kept."""


@flow(name="featurize-labels")
def featurize_labels_flow(
    label_dirs: list[str], vocab_dir: str, out_dirs: list[str], retries: int = 2
) -> dict[str, Any]:
    """Write the n-gram ids of every labelled shard in `label_dirs` to the matching `out_dirs`, resuming: shards
    already featurised with this vocabulary from these labels are kept (see `sparse_distill.features`).

    Shards run on this flow's task runner (`flows.runners.make_task_runner`); one that still fails after `retries`
    ends the flow Failed, naming it, with the others kept for the next run.
    """
    work = t.plan_featurizing(label_dirs, vocab_dir, out_dirs)
    total = sum(w["rows"] for w in work)
    progress = Progress(f"Featurising {len(work)} shards with {vocab_dir}", 0, total, "featurised", "docs")
    failures = fan_out(
        t.featurize_shard.with_options(retries=retries),
        work,
        lambda w: (vocab_dir, w),
        progress,
        weight=lambda w: w["rows"],
    )
    if failures:
        names = ", ".join(f"{w['out_dir']} shard {w['index']:05d}" for w, _ in failures)
        raise FeaturizingFailed(
            f"{len(failures)} of {len(work)} shards failed ({names}: {failures[0][1]}); the others are kept. "
            "Re-run the same command."
        )
    return {"shards": len(work), "docs": total}
