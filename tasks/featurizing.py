"""Prefect tasks for featurising labelled shards once: plan the shards still to do, featurise one.

Thin wrappers over `sparse_distill.features`: they take folders and a shard number and return small records; the
n-gram ids go straight to Parquet on the worker.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sparse_distill import features
from sparse_distill.soft_labels import read_manifest
from sparse_distill.vocab import NgramVocab


@task(name="plan-featurizing", cache_policy=NO_CACHE)
def plan_featurizing(label_dirs: list[str], vocab_dir: str, out_dirs: list[str]) -> list[dict[str, Any]]:
    """The shards still to featurise, one work item each (label folder, output folder, shard number, rows, and the
    vocabulary's checksum)."""
    work = []
    vsum = features.vocab_checksum(vocab_dir)  # hashed once here, not by every shard's task
    for label_dir, out_dir in zip(label_dirs, out_dirs, strict=True):
        plan = read_manifest(label_dir)
        shards = plan.shards
        pending = features.pending_feature_shards(label_dir, vocab_dir, out_dir, vsum, plan)
        work += [
            {"label_dir": label_dir, "out_dir": out_dir, "index": i, "rows": shards[i].size, "vocab_checksum": vsum}
            for i in pending
        ]
        get_run_logger().info("%s: %d of %d shards to featurise", out_dir, len(pending), len(shards))
    return work


@lru_cache(maxsize=1)
def _vocab(vocab_dir: str, checksum: str) -> NgramVocab:
    # One load per worker process and vocabulary, not one per shard (a 1M-row vocabulary takes seconds to load).
    return NgramVocab.load(vocab_dir)


@task(name="featurize-shard", cache_policy=NO_CACHE, retry_delay_seconds=2)
def featurize_shard(vocab_dir: str, work: dict[str, Any]) -> dict[str, Any]:
    """Featurise one labelled shard (`work`: from `plan_featurizing`) on whichever worker runs this."""
    vsum = work["vocab_checksum"]
    record = features.featurize_shard(work["label_dir"], _vocab(vocab_dir, vsum), vsum, work["out_dir"], work["index"])
    get_run_logger().info("%s shard %05d: %d docs (pid %d)", work["out_dir"], record.shard, record.rows, os.getpid())
    return dict(record.__dict__)
