"""A task with no dev split: the flow holds part of train out as dev, as a stage of its own (cached), and the later
stages read the rows it kept."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_the_later_stages_train_on_the_rows_the_holdout_stage_kept(tiny_config, tmp_path):
    from pathlib import Path

    from flows.pipeline_flow import vocab_flow
    from sparse_distill.pipeline import split_config
    from sparse_distill.run_store import read_stage

    config = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(update={"dev": None})})
    run_dir = tmp_path / "run"
    vocab = vocab_flow(config=config, run_dir=str(run_dir))
    holdout = read_stage(run_dir, "holdout")
    assert (holdout["train_rows"], holdout["dev_rows"]) == (270, 30)
    # The transfer set is made from the 270 rows kept, not the 300 of the file.
    assert "per train row (2,160)" in read_stage(run_dir, "transfer")["reason"]
    assert split_config(config, run_dir).data.dev == holdout["dev"]

    # Again: the held-out files are not written again and the vocabulary is served from its stage.
    stamp = Path(holdout["dev"]).stat().st_mtime_ns
    again = vocab_flow(config=config, run_dir=str(run_dir))
    assert Path(holdout["dev"]).stat().st_mtime_ns == stamp and again["fingerprint"] == vocab["fingerprint"]
