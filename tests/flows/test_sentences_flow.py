"""A task of short texts with a corpus of documents: the flow splits the documents into sentences as a stage of its
own (cached), and the later stages read the sentences."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_the_vocabulary_is_counted_over_the_corpus_sentences_and_the_split_is_cached(tiny_config, tmp_path):
    from flows.pipeline_flow import vocab_flow
    from sparse_distill.pipeline import split_config
    from sparse_distill.run_store import read_stage

    reviews = pd.read_parquet(Path(tiny_config.data.data_dir) / "corpus.parquet")["text"].tolist()
    documents = [". ".join(reviews[i : i + 10]) + "." for i in range(0, len(reviews), 10)]
    pd.DataFrame({"id": [f"doc{i}" for i in range(40)], "text": documents}).to_parquet(tmp_path / "docs.parquet")
    config = tiny_config.model_copy(
        update={"data": tiny_config.data.model_copy(update={"corpus": [str(tmp_path / "docs.parquet")]})}
    )
    run_dir = tmp_path / "run"
    vocab = vocab_flow(config=config, run_dir=str(run_dir))
    split = read_stage(run_dir, "sentences")
    assert split["split"] and split["sentences"] == 400
    # The later stages read the 400 sentences, not the 40 documents: the transfer set tops the corpus up.
    assert "the corpus has 400, so 2,000 transfer texts" in read_stage(run_dir, "transfer")["reason"]
    sentences = Path(split["corpus"][0])
    assert sentences.parent == run_dir / "sentences"
    assert split_config(config, run_dir).data.corpus == [str(sentences)]

    # Again: the split is served from its stage (the file is not written again) and so is the vocabulary.
    stamp = sentences.stat().st_mtime_ns
    again = vocab_flow(config=config, run_dir=str(run_dir))
    assert sentences.stat().st_mtime_ns == stamp and again["fingerprint"] == vocab["fingerprint"]
