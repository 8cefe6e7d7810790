"""The counting flow: a Dask cluster of two workers equals the in-process job; a poison shard fails alone and a
re-run counts only it; the `vocab` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_distill.config import VocabJob
from sparse_distill.counting import run_count_job

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _corpus(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(300)])
    p = 1.0 / np.arange(1, 301)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(2, 30)), p=p / p.sum())) for _ in range(n)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=400)
    return path


def _job(corpus: Path, out: Path, **vocab) -> VocabJob:
    return VocabJob(
        inputs=[str(corpus)], out=str(out), vocab={"size": 2000, "shard_size": 500, "partitions": 6, **vocab}
    )


def _flow(job: VocabJob):
    from flows.count_flow import count_ngrams_flow
    from flows.runners import make_task_runner

    return count_ngrams_flow.with_options(task_runner=make_task_runner(job.vocab))(job=job, return_state=True)


@pytest.mark.slow
def test_dask_cluster_of_two_workers_equals_the_in_process_job(tmp_path):
    corpus = _corpus(tmp_path / "corpus.parquet", 3000)
    local = run_count_job(_job(corpus, tmp_path / "local"))
    state = _flow(_job(corpus, tmp_path / "dask", runner="dask", workers=2))
    assert state.is_completed()
    assert pq.read_table(tmp_path / "dask" / "vocab.parquet").equals(
        pq.read_table(tmp_path / "local" / "vocab.parquet")
    )
    assert {k: v for k, v in state.result().items() if k not in ("out", "vocab", "seconds")} == {
        k: v for k, v in local.items() if k not in ("out", "vocab")
    }


@pytest.mark.slow
def test_poison_shard_fails_alone_and_a_rerun_counts_only_it(tmp_path, monkeypatch):
    from sparse_distill import counting

    corpus = _corpus(tmp_path / "corpus.parquet", 2000, seed=1)
    job = _job(corpus, tmp_path / "out", runner="thread", workers=2, retries=1)
    real = counting.count_job_shard
    calls: list[int] = []

    def poisoned(job, work):
        calls.append(work["shard"]["index"])
        if work["shard"]["index"] == 1:
            raise MemoryError("injected: out of memory on shard 1")
        return real(job, work)

    monkeypatch.setattr(counting, "count_job_shard", poisoned)
    state = _flow(job)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "1 of 4 shards failed" in message and "00001.parquet" in message and "injected" in message
    assert calls.count(1) == 2  # tried, retried once, then recorded
    assert not (tmp_path / "out" / "vocab.parquet").exists()

    calls.clear()
    monkeypatch.setattr(counting, "count_job_shard", lambda *a: calls.append(a[1]["shard"]["index"]) or real(*a))
    assert _flow(job).is_completed()
    assert calls == [1]
    assert pq.read_table(tmp_path / "out" / "vocab.parquet").num_rows == 2000


@pytest.mark.slow
def test_vocab_command_end_to_end(tmp_path, capsys):
    from flows.cli import main

    corpus = _corpus(tmp_path / "corpus.parquet", 1200, seed=2)
    out = tmp_path / "v"
    args = ["vocab", "--input", str(corpus), "--out", str(out), "--size", "500", "--ngram-max", "3"]
    assert main([*args, "--shard-size", "400", "--partitions", "4", "--workers", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["size"] == 500 and result["docs"] == 1200
    expected = run_count_job(
        VocabJob(inputs=[str(corpus)], out=str(tmp_path / "ref"), vocab={"size": 500, "ngram_max": 3})
    )
    assert result["distinct_ngrams"] == expected["distinct_ngrams"]
    assert pq.read_table(out / "vocab.parquet").equals(pq.read_table(tmp_path / "ref" / "vocab.parquet"))
    # Other settings in the same --out need --replan; bad arguments exit 2 with the field named.
    assert main([*args[:-2], "--ngram-max", "2"]) == 2
    assert "--replan" in capsys.readouterr().err
    assert main(["vocab", "--input", str(corpus), "--out", str(out), "--memory-mb", "1"]) == 2
    assert "memory_mb" in capsys.readouterr().err
    assert main(["vocab", "--input", str(tmp_path / "none.parquet"), "--out", str(out)]) == 2
    assert "none.parquet: no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_pipeline_vocab_stage_fans_out_and_matches_the_in_process_stage(tiny_config, tmp_path):
    from flows.pipeline_flow import vocab_flow

    local = vocab_flow(config=tiny_config, run_dir=str(tmp_path / "one"))
    fanned = tiny_config.model_copy(
        update={"vocab": tiny_config.vocab.model_copy(update={"workers": 2, "partitions": 3, "shard_size": 50})}
    )
    spread = vocab_flow(config=fanned, run_dir=str(tmp_path / "two"))
    # Runner, shard size and partitions never change the vocabulary, nor the stage's cache key.
    assert spread["fingerprint"] == local["fingerprint"]
    assert (spread["size"], spread["distinct_ngrams"]) == (local["size"], local["distinct_ngrams"])
    one = pq.read_table(tmp_path / "one" / "vocab" / "vocab.parquet")
    two = pq.read_table(tmp_path / "two" / "vocab" / "vocab.parquet")
    assert one.equals(two)
    assert len(list((tmp_path / "two" / "vocab" / "spills").glob("*.json"))) > 1
