"""Shared fixtures: offline settings, a tiny random teacher with a tokenizer trained here, tiny data, one Prefect
test harness for the whole session."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Before anything imports Prefect, MLflow or transformers: offline, quiet, project-local state.
_STATE = Path(__file__).resolve().parent.parent / ".pytest_state"
for key, value in {
    "PREFECT_HOME": str(_STATE / "prefect"),
    "SPARSE_DISTILL_CACHE": str(_STATE / "cache"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # transfer.background "auto" reads data/demo/background.parquet where a checkout has one: not in the tests.
    "SPARSE_DISTILL_BACKGROUND": str(_STATE / "no-background.parquet"),
}.items():
    os.environ[key] = value
os.environ.pop("PREFECT_API_URL", None)
(_STATE / "prefect").mkdir(parents=True, exist_ok=True)

POS = ["great", "wonderful", "superb", "moving", "delightful", "brilliant", "charming", "fun"]
NEG = ["awful", "boring", "dull", "terrible", "tedious", "bland", "messy", "weak"]
FILLER = ["the", "film", "movie", "plot", "actors", "story", "was", "is", "quite", "really", "and", "but", "a"]


def make_reviews(n: int, seed: int) -> list[tuple[str, str]]:
    """Synthetic reviews whose label follows the sentiment words: learnable by a bag of n-grams."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 12))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POS if label == "pos" else NEG))
        out.append((" ".join(words), label))
    return out


def write_split(path: Path, rows: list[tuple[str, str]], labelled: bool = True, prefix: str = "d") -> Path:
    cols = {"id": [f"{prefix}{i}" for i in range(len(rows))], "text": [t for t, _ in rows]}
    if labelled:
        cols["label"] = [lab for _, lab in rows]
    pq.write_table(pa.table(cols), path)
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """train/dev/test/corpus Parquet files of synthetic reviews."""
    d = tmp_path_factory.mktemp("data")
    write_split(d / "train.parquet", make_reviews(300, 1), prefix="tr")
    write_split(d / "dev.parquet", make_reviews(80, 2), prefix="dv")
    write_split(d / "test.parquet", make_reviews(80, 3), prefix="te")
    write_split(d / "corpus.parquet", make_reviews(400, 4), labelled=False, prefix="co")
    return d


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_data) -> Path:
    """A tiny random BERT with a WordPiece tokenizer trained here: no download."""
    from sparse_distill.testing import make_tiny_teacher

    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"), [t for t, _ in make_reviews(500, 9)])


def tiny_pipeline(tiny_data: Path, tiny_teacher: Path, mlflow_uri: str, name: str = "tiny") -> dict:
    """A pipeline config (as a dict) over the tiny data and teacher that runs in seconds."""
    return {
        "name": name,
        "data": {
            "data_dir": str(tiny_data),
            "train": "train.parquet",
            "dev": "dev.parquet",
            "test": "test.parquet",
            "corpus": ["corpus.parquet"],
            "id_column": "id",
        },
        "teacher": {"model": str(tiny_teacher), "max_length": 32, "batch_size": 32, "lr": 3e-3, "epochs": 4},
        "label": {"shard_size": 128, "batch_size": 64},
        "vocab": {"size": 500, "ngram_max": 2},
        "transfer": {"min_documents": 0},  # copies per train row only: a tiny task labels a tiny transfer set
        "student": {"dim": 16, "hidden": 16},
        "distill": {"lr": 1e-2, "batch_size": 64, "epochs": 6, "eval_every": 10, "shuffle_buffer": 200},
        "finetune": {"lr": 1e-3, "batch_size": 64, "epochs": 1, "eval_every": 5},
        "scratch": {"lr": 1e-2, "batch_size": 64, "epochs": 12, "eval_every": 10},
        "evaluate": {"speed_docs": 64, "teacher_speed_docs": 32},
        "tracking": {"tracking_uri": mlflow_uri, "experiment": name},
    }


@pytest.fixture(scope="session")
def make_tiny_pipeline():
    """`tiny_pipeline` for tests that write the config to a file of their own."""
    return tiny_pipeline


@pytest.fixture
def tiny_config(tiny_data, tiny_teacher, tmp_path):
    """The tiny pipeline config, tracking into this test's own MLflow store."""
    from sparse_distill.config import PipelineConfig

    return PipelineConfig.model_validate(tiny_pipeline(tiny_data, tiny_teacher, f"sqlite:///{tmp_path / 'mlflow.db'}"))


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect server for every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    # A cold start (migrations on a fresh PREFECT_HOME) on 2 busy cores can pass a minute.
    with prefect_test_harness(server_startup_timeout=180):
        yield


def _task_states(flow_run_id, timeout: float = 30.0) -> dict[str, str]:
    import time

    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def fetch():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {r.name: r.state for r in runs}

    # Task run states reach the API through events, after the flow returns: wait until none is still in flight.
    deadline = time.monotonic() + timeout
    while True:
        states = anyio.run(fetch)
        if all(s.is_final() for s in states.values()) or time.monotonic() > deadline:
            return {name: s.name for name, s in states.items()}
        time.sleep(0.5)


@pytest.fixture(scope="session")
def task_states():
    """The task runs of a finished flow run, name -> state name, once their states have all reached the API."""
    return _task_states
