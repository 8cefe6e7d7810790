"""Typed configuration: one model per stage, loaded from YAML; unknown keys are errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sparse_distill import __version__

_M = TypeVar("_M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Where and how a section's work runs, not what it computes: left out of cache keys.
    RUNTIME_FIELDS: ClassVar[set[str]] = set()
    # Fields added after runs were cached, with the value that reproduces those runs: left out of the key at that
    # value, so the old runs stay valid (they were made with exactly that behaviour).
    ADDED_FIELDS: ClassVar[dict[str, Any]] = {}

    def cache_dump(self) -> dict[str, Any]:
        """The section as it enters cache keys (and checkpoint keys): runtime fields and new fields at their old
        behaviour left out."""
        dumped = self.model_dump(mode="json", exclude=self.RUNTIME_FIELDS)
        return {k: v for k, v in dumped.items() if self.ADDED_FIELDS.get(k, object()) != v}


class DataConfig(_Strict):
    """Where the splits live and which columns hold what."""

    data_dir: str | None = Field(None, description="Base folder for relative split paths (e.g. ../shared/data/sst2).")
    train: str = Field(..., description="Train split: Parquet, CSV, JSONL, a saved datasets folder or hub:NAME:SPLIT.")
    dev: str | None = Field(
        None,
        description="Dev split: model selection and the headline accuracy. None: `dev_holdout` of the train rows are "
        "held out as dev (a stage of the run, `holdout`).",
    )
    dev_holdout: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description="Without a dev split: the share of train rows held out as dev, per label (a label keeps at least "
        "one train row), at most 5,000 rows, the same rows on every run of the same train file.",
    )
    test: str | None = Field(None, description="Optional test split, reported beside dev.")
    corpus: list[str] = Field(default_factory=list, description="Unlabelled in-domain corpus files (globs allowed).")
    text_column: str = Field("text", description="Column holding the document text.")
    label_column: str = Field("label", description="Column holding the gold label (int or string).")
    id_column: str | None = Field(None, description="Column holding a document id; None derives ids from row numbers.")
    max_train_samples: int | None = Field(
        None,
        ge=1,
        description="Use only the first N train rows (quick runs; on a file sorted by label that drops whole labels).",
    )
    max_corpus_samples: int | None = Field(
        None, ge=1, description="Use only the first N corpus texts (its sentences, when the corpus is split)."
    )
    corpus_split: Literal["auto", "sentences", "none"] = Field(
        "auto",
        description="Split the corpus's documents into sentences of 5-40 words before labelling: 'auto' when their "
        "median length is over 4 times the train texts' and over 60 words (a task of sentences, a corpus of "
        "documents), 'sentences' always, 'none' never.",
    )


class TeacherConfig(_Strict):
    """Fine-tuning the transformer teacher."""

    model: str = Field(..., description="Local Hugging Face checkpoint folder (or a hub name when online).")
    max_length: int | Literal["auto"] = Field(
        "auto",
        description="Tokens per document in fine-tuning, labelling and evaluation; longer ones are cut (truncation). "
        "'auto': a stage of the run (`teacher_length`) sets it from the task's texts: long enough for 90% of the "
        "train and of the dev texts, in steps of 32 tokens, from 32 to max_length_cap. A config copied from "
        "configs/sst2.yaml onto a task of emails or reviews then no longer reads 64 tokens of them.",
    )
    max_length_cap: int = Field(
        256,
        ge=8,
        description="The most tokens max_length 'auto' chooses: the teacher's fine-tuning and labelling time grow "
        "with it (on a CPU, 256 tokens cost about four times 64).",
    )
    truncation: Literal["head", "head_tail"] = Field(
        "head_tail",
        description="How a document longer than max_length is cut, in fine-tuning, labelling and evaluation alike: "
        "head keeps its first tokens; head_tail its first half and last half (Sun et al. 2019), where a review's "
        "verdict usually is. By measurement (README: 'Long documents') head_tail lifts the teacher on IMDB "
        "ratings; texts within max_length are the same either way. Recorded with the teacher's weights.",
    )
    pooling: Literal["auto", "mean", "model"] = Field(
        "auto",
        description="What the new classifier head reads: mean, the mean of the encoder's last hidden states over the "
        "text's tokens (how sentence encoders such as all-MiniLM-L6-v2 were trained); model, the checkpoint's own "
        "head (BERT's pooler on [CLS], RoBERTa's <s> token); auto: mean where the model has a BERT-style pooler to "
        "replace, model otherwise. By measurement (README: 'The teacher's pooling') mean lifts the teacher on tasks "
        "of many classes. Recorded with the teacher's weights; a skip_finetune checkpoint keeps its own head.",
    )
    batch_size: int = Field(32, ge=1, description="Training batch size.")
    eval_batch_size: int = Field(64, ge=1, description="Batch size for dev evaluation and labelling.")
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.06, ge=0, le=1, description="Share of steps with linear warm-up.")
    epochs: float | None = Field(
        None,
        gt=0,
        description="Passes over the train rows (fractions allowed); None: a budget from the data, enough passes to "
        "see about budget_texts train texts, within 1 to 5 (teacher.plan_teacher_budget).",
    )
    budget_texts: int = Field(
        30_000,
        ge=1,
        description="With epochs None: passes enough to see about this many train texts, within 1 to 5. Ignored when "
        "epochs is set. 30,000 by measurement (README: 'The teacher's budget'): 60,000 lifted the teacher of a 12k-row "
        "task by up to 1.1 points of test and its student by nothing, for twice the fine-tuning time.",
    )
    eval_every: int | None = Field(
        None, ge=1, description="Evaluate on dev every N steps (None: about 6 times per budget, at most once a pass)."
    )
    max_train_samples: int | None = Field(None, ge=1, description="Fine-tune on a random sample of N train rows.")
    seed: int = Field(13, description="Random seed.")
    skip_finetune: bool = Field(False, description="Use the checkpoint as it is (already fine-tuned on the task).")
    checkpoint_every: int | None = Field(
        200,
        ge=1,
        description="Every N steps, save the training state (weights, optimizer, scheduler, step, RNG) to resume "
        "from after a kill; None: never. Not part of the cache key.",
    )

    # How the work is checkpointed, not what it computes: left out of the stage's cache key.
    RUNTIME_FIELDS: ClassVar[set[str]] = {"checkpoint_every"}
    ADDED_FIELDS: ClassVar[dict[str, Any]] = {"truncation": "head", "pooling": "model", "budget_texts": 30_000}

    def cache_dump(self) -> dict[str, Any]:
        """As `_Strict.cache_dump`; the cap only chooses a number: once max_length is that number (as every stage
        sees it, after the teacher_length stage), the cap is left out of the key. So is budget_texts where epochs
        (or skip_finetune) decides the budget without it."""
        dumped = super().cache_dump()
        if isinstance(self.max_length, int):
            dumped.pop("max_length_cap", None)
        if self.epochs is not None or self.skip_finetune:
            dumped.pop("budget_texts", None)
        return dumped


class RunnerConfig(_Strict):
    """Where a stage's shards run: the Prefect task runner and its size."""

    runner: Literal["thread", "process", "dask"] = Field(
        "thread", description="Prefect task runner for the shards: threads, local processes, or Dask."
    )
    workers: int = Field(1, ge=1, description="Shards run at once (threads, processes or Dask workers).")
    dask_address: str | None = Field(None, description="Scheduler address of an existing Dask cluster (tcp://...).")
    retries: int = Field(2, ge=0, description="Retries of a failing shard before it is recorded as failed.")

    # How the work is spread: these settings never change the results, so they stay out of cache keys.
    RUNTIME_FIELDS: ClassVar[set[str]] = {"runner", "workers", "dask_address", "retries"}

    @property
    def fans_out(self) -> bool:
        """Whether the shards run on a runner with more than the calling thread (else a stage does them itself)."""
        return not (self.runner == "thread" and self.workers == 1)


class LabelConfig(RunnerConfig):
    """Labelling the train set and the corpus with the teacher's soft labels."""

    shard_size: int = Field(10_000, ge=1, description="Documents per Parquet shard.")
    batch_size: int = Field(64, ge=1, description="Teacher inference batch size.")
    max_length: int | None = Field(None, ge=8, description="Tokens per document (default: the teacher's max_length).")
    include_train: bool = Field(True, description="Label the train set too (KD on corpus + train).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "Teacher numerics: bf16 (GPU or CPU) or fp16 (GPU) autocast; auto = bf16 on a GPU and on a CPU with bf16"
            " instructions (AVX512-BF16, AMX), fp32 elsewhere. Set fp32 or bf16 to pin labels across machines."
        ),
    )
    quantize_int8: bool = Field(False, description="Dynamic int8 quantisation of the teacher on a CPU (faster).")


class VocabConfig(RunnerConfig):
    """The n-gram vocabulary, and how its counting is spread (see sparse_distill.counting)."""

    size: int = Field(1_000_000, ge=1, description="Keep the top |V| n-grams by total count.")
    ngram_max: int = Field(
        2,
        ge=1,
        le=8,
        description="Count n-grams for n = 1..ngram_max. 2 by measurement: with task-sized data the 3- and 4-grams are "
        "mostly seen once and add noise (the paper's 4 pays off with a corpus of tens of millions of documents).",
    )
    min_count: int = Field(1, ge=1, description="Drop n-grams seen fewer times than this.")
    subword_buckets: int = Field(
        200_000,
        ge=0,
        description="Embedding rows that each word's character n-grams (fastText's subwords) are hashed into, after "
        "the n-grams; 0: no subwords. On by measurement (README: 'Subwords'): words the train set lacks or rarely "
        "has still get the rows of their pieces.",
    )
    subword_min: int = Field(4, ge=2, description="Shortest character n-gram of a subword (fastText's minn).")
    subword_max: int = Field(4, ge=2, description="Longest character n-gram of a subword (fastText's maxn).")
    tie_rule: Literal["alphabetical", "sklearn"] = Field(
        "alphabetical",
        description="Order among n-grams tied at the cut (see sparse_distill.vocab); 'sklearn' holds all counts "
        "in memory at the final selection.",
    )
    shard_size: int = Field(10_000, ge=1, description="Documents per counting shard (the unit of resume).")
    memory_mb: int = Field(
        1024, ge=64, description="Memory per worker for counting and summing; partial counts spill to disk beyond it."
    )
    partitions: int = Field(64, ge=1, le=65_536, description="Hash partitions of the spilled counts (reduce tasks).")

    # The kept vocabulary does not depend on these either.
    RUNTIME_FIELDS: ClassVar[set[str]] = RunnerConfig.RUNTIME_FIELDS | {"shard_size", "memory_mb", "partitions"}

    @model_validator(mode="after")
    def _subword_lengths(self) -> VocabConfig:
        if self.subword_min > self.subword_max:
            raise ValueError(f"subword_min ({self.subword_min}) is above subword_max ({self.subword_max})")
        return self


class TransferConfig(_Strict):
    """A transfer set: new texts made from the train texts (see sparse_distill.augment.make_transfer_copies), labelled
    by the teacher like a corpus. It gives distillation data when the task has little or no unlabelled corpus."""

    size: int | None = Field(
        None,
        ge=0,
        description="Texts to generate; None: auto (enough for copies_per_text x train rows of distillation data "
        "beside the corpus, at most max_size); 0: no transfer set.",
    )
    copies_per_text: int = Field(
        8, ge=1, description="Auto size: distil on at least this many documents per train row (corpus + transfer)."
    )
    min_documents: int = Field(
        64_000,
        ge=0,
        description="Auto size: distil on at least this many documents (corpus + transfer) however few the train "
        "rows, at most max_size.",
    )
    max_size: int = Field(600_000, ge=1, description="Auto size: at most this many texts.")
    methods: list[Literal["eda", "ngram", "dropout", "mix", "neighbour"]] = Field(
        ["eda", "ngram", "dropout", "mix", "neighbour"],
        min_length=1,
        description="Ways of making a text; one drawn per text. 'neighbour' swaps words for their nearest words in "
        "the teacher's input embeddings (teacher.model), bringing words the train set lacks.",
    )
    neighbours: int = Field(8, ge=1, description="Neighbour replacement: candidates per word.")
    teacher_words: bool = Field(
        True,
        description="Add every whole word of the teacher's tokenizer (teacher.model) as a one-word text, so the "
        "student learns what the teacher makes of words the train set lacks (only with a transfer set).",
    )
    background: str | None = Field(
        "auto",
        description="Unlabelled sentences of no particular domain (a Parquet file with a `text` column) added to the "
        "transfer set: the teacher labels them and the student learns what the teacher makes of words and phrases "
        "the train set lacks. 'auto': `data/demo/background.parquet` (written by `make install`) in the working "
        "folder, else in the package's checkout, else none; None: none. Only with a transfer set.",
    )
    background_size: int | None = Field(
        None,
        ge=0,
        description="Background sentences added (the file's first rows); None: auto, as many as the distillation "
        "documents wanted beside the corpus (copies_per_text x train rows, at least min_documents), at most the "
        "file's rows, so a task with a corpus of its own takes few or none.",
    )
    replace_rate: float = Field(
        0.3, gt=0, le=1, description="Neighbour replacement: probability of replacing each word that has neighbours."
    )
    alpha: float = Field(0.1, gt=0, le=1, description="EDA: share of words replaced, deleted or swapped.")
    dropout: float = Field(0.2, gt=0, lt=1, description="Word dropout: probability of dropping each word.")
    seed: int = Field(13, description="Random seed of the generator.")
    hard_size: int | None = Field(
        None,
        ge=0,
        description="A second round of transfer texts, the ones a first student is least sure of: hard_pool times "
        "this many new texts are made like the transfer set, a student distilled on the labels so far (the probe) "
        "scores them, and those with the smallest margin between its two likeliest classes are labelled by the "
        "teacher and distilled on with the rest. None: as many as the transfer set's generated texts (so none when "
        "it has none); 0: no second round.",
    )
    hard_pool: int = Field(
        8, ge=1, description="Second round: candidate texts made per text kept for being least sure of."
    )
    hard_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Second round: the share of its texts kept for the probe's doubt; the rest are new texts taken at "
        "random. Half by measurement: on Rotten Tomatoes, whose teacher cannot call most of the texts its student "
        "doubts, a round of only those costs the students 0.6 points, and half of them keeps most of SST-2's gain.",
    )

    ADDED_FIELDS: ClassVar[dict[str, Any]] = {"min_documents": 0}
    # The second round's settings: its own stage's key, not the transfer set's (they do not change the first round).
    HARD_FIELDS: ClassVar[set[str]] = {"hard_size", "hard_pool", "hard_share"}

    # The background sentences enter cache keys by the file's content (`pipeline.background_key`), not by name.
    BACKGROUND_FIELDS: ClassVar[set[str]] = {"background", "background_size"}

    def cache_dump(self) -> dict[str, Any]:
        """The section as it enters cache keys, without the background fields (see `BACKGROUND_FIELDS`)."""
        return {k: v for k, v in super().cache_dump().items() if k not in self.BACKGROUND_FIELDS}

    def first_round_dump(self) -> dict[str, Any]:
        """The transfer set's cache key: the section without the second round's settings."""
        return {k: v for k, v in self.cache_dump().items() if k not in self.HARD_FIELDS}


class StudentConfig(_Strict):
    """The Deep Averaging Network."""

    dim: int = Field(100, ge=1, description="Embedding dimension d of the n-gram table.")
    hidden: int = Field(256, ge=1, description="Hidden size of the dense layer.")
    pooling: Literal["mean", "max", "sum"] = Field(
        "sum",
        description="How n-gram embeddings are pooled. sum by measurement: each row gets the whole gradient of its "
        "document instead of a 1/length share, which trains short texts better (the paper's DAN uses mean).",
    )
    layers: int = Field(1, ge=1, le=8, description="Dense hidden layers after pooling (the paper's DAN has 1).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the pooled vector.")
    init_std: float = Field(0.1, gt=0, description="Std of the normal init of the embedding table.")
    members: int = Field(
        5,
        ge=1,
        description="Independent DANs in one student, trained one after another with their own seeds; each pools "
        "dim // members columns of the table through its own dense layers, and the student predicts the mean of "
        "their probabilities: an ensemble for the memory and speed of one table. At most dim members are made. "
        "5 by measurement (README: 'Members'): five of d = 20 beat three of d = 33 on six tasks of six.",
    )

    ADDED_FIELDS: ClassVar[dict[str, Any]] = {"layers": 1, "members": 1}

    @property
    def member_count(self) -> int:
        """Members actually trained: `members`, but never more than `dim` (each member needs a column)."""
        return min(self.members, self.dim)


# The distillation losses `TrainConfig.loss` names (the pipeline and the training loop take the same names).
DistillLoss = Literal["kl", "logit_mse"]


class TrainConfig(_Strict):
    """One student training stage: distillation, fine-tuning, or the from-scratch baseline."""

    lr: float = Field(1e-3, gt=0, description="Learning rate of the dense layers (Adam).")
    table_lr: float | None = Field(
        1e-2,
        gt=0,
        description="Learning rate of the n-gram table (`table_optimizer`); None: the same as `lr`. Higher than the "
        "dense layers' because each row is updated only when its n-gram occurs (mean pooling also divides it).",
    )
    batch_size: int = Field(256, ge=1, description="Documents per step.")
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training data; None: a budget derived from the data size."
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after N steps whatever the epochs.")
    eval_every: int | None = Field(
        None, ge=1, description="Evaluate on dev every N steps (None: about 40 times per budget, at most once a pass)."
    )
    patience: int | None = Field(
        8, ge=1, description="Stop after N evaluations without a dev improvement (None: train the whole budget)."
    )
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="Learning-rate decay over the step budget, after the warm-up."
    )
    warmup_ratio: float = Field(0.02, ge=0, lt=1, description="Share of the step budget with a linear warm-up.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the KL loss (distillation only).")
    gold_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="The pipeline's distill stage only: the train set's documents (labelled by the teacher too) are "
        "distilled towards this mix of their gold label and the teacher's distribution (`(1 - w) * teacher + w * "
        "gold`), and so are the transfer texts made from them, towards their train rows' gold labels (a mix of two "
        "texts: both labels, by their share of its words); corpus documents and the teacher's one-word texts keep "
        "the teacher's. 0: the teacher's alone, as in the paper. By measurement (README: 'Gold labels in "
        "distillation') 0.5 lifts the KD student, most where the teacher is weak.",
    )
    loss: DistillLoss = Field(
        "logit_mse",
        description="The pipeline's distill stage only (the gold-label stages learn by cross-entropy): kl is the "
        "paper's KL to the target distribution; logit_mse is the mean squared error between the student's centred "
        "logits and the centred log of the target distribution (the teacher's logits, up to a constant), as in Tang "
        "et al. (2019). By measurement (README: 'The distillation loss') logit_mse lifts KD+FT by about half a point.",
    )
    ngram_dropout: float = Field(
        0.0, ge=0, lt=1, description="Drop each n-gram of a training document with this probability (DAN students)."
    )
    shuffle_buffer: int = Field(100_000, ge=1, description="Documents held in the streaming shuffle buffer.")
    seed: int = Field(13, description="Random seed.")
    average_window: float = Field(
        0.125,
        ge=0,
        lt=1,
        description="Weight averaging: dev is scored, and the best checkpoint kept, on an exponential moving average "
        "of the weights (updated at each evaluation) whose time constant is this share of the step budget; "
        "training goes on from the weights themselves. The average smooths the noise of the high learning rates "
        "(README: 'Averaged weights'); it costs one more copy of the table. 0 turns it off.",
    )
    table_optimizer: Literal["sparse_adam", "rowwise_adam", "rowwise_adagrad"] = Field(
        "rowwise_adam",
        description="Optimizer of the n-gram table: row-wise Adam (a first moment the size of the table, one "
        "second-moment float per row; by measurement 2-2.5x faster per step than SparseAdam at the same accuracy), "
        "torch's SparseAdam (the paper's; two state tensors the size of the table) or row-wise Adagrad (one float per "
        "row); see sparse_distill.sparse_optim. The dense layers always use Adam.",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="Where the student trains: auto (a CUDA GPU when there is one), cpu, cuda or cuda:N. On a GPU "
        "batches are pinned and copied asynchronously and the dense layers run in bf16 autocast.",
    )
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Write a resumable checkpoint every N steps (None: by time only)."
    )
    checkpoint_every_minutes: float | None = Field(
        5.0,
        gt=0,
        description="Write a resumable checkpoint every M minutes (None: by steps only; both None: no checkpoints). "
        "A killed stage resumes from it; it is deleted when the stage finishes.",
    )

    # Where and how safely a stage trains, not what it learns: kept out of cache keys (see `cache_dump`).
    RUNTIME_FIELDS: ClassVar[set[str]] = {"device", "checkpoint_every_steps", "checkpoint_every_minutes"}
    # Fields added after runs were cached, with their default: left out of the key at that default, so the old runs
    # stay valid (they were trained with exactly that behaviour).
    ADDED_FIELDS: ClassVar[dict[str, Any]] = {
        "table_optimizer": "sparse_adam",
        "average_window": 0.0,
        "gold_weight": 0.0,
        "loss": "kl",
    }


class EvalConfig(_Strict):
    """Evaluation and throughput measurement."""

    batch_size: int = Field(32, ge=1, description="Batch size for the docs/s measurement (raw text in).")
    speed_docs: int = Field(2000, ge=32, description="Documents timed for the student's throughput.")
    teacher_speed_docs: int = Field(256, ge=32, description="Documents timed for the teacher's throughput.")
    threads: int | None = Field(None, ge=1, description="torch threads while timing (default: all cores).")
    fasttext: bool = Field(
        True,
        description="Train fastText on the same train rows, shuffled (word bigrams, 25 epochs, lr 0.5, one thread, "
        "seed 13), and report it beside the students: the baseline a student has to beat, and the share of the "
        "teacher's lead over it that the student keeps.",
    )


class TrackingConfig(_Strict):
    """MLflow tracking."""

    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite ./mlflow.db).")
    experiment: str = Field("sparse-distill", description="MLflow experiment name.")
    log_model: bool = Field(True, description="Log the student as an MLflow pyfunc model.")
    registered_model: str | None = Field(
        None,
        min_length=1,
        description="Register the logged student under this MLflow Model Registry name and apply the quality gate "
        "(None: do not register).",
    )
    min_retention: float = Field(
        0.9, gt=0, le=1.5, description="Share of the teacher's test accuracy the student must keep to become champion."
    )


class LabelJob(_Strict):
    """A standalone labelling job (`sparse-distill label`): a teacher, corpus files, an output directory."""

    teacher: str = Field(..., description="Fine-tuned teacher folder (a Hugging Face sequence classifier).")
    corpus: list[str] = Field(..., min_length=1, description="Corpus files: Parquet, JSONL, CSV/TSV or text; globs.")
    out: str = Field(..., description="Output directory: manifest.json and shards/*.parquet.")
    text_column: str = Field("text", description="Column (or JSON key) holding the document text.")
    id_column: str | None = Field(None, description="Column holding document ids; None derives `<file>:<row>`.")
    limit: int | None = Field(None, ge=1, description="Label only the first N documents of each file.")
    max_length: int = Field(128, ge=8, description="Teacher tokens per document (used when label.max_length is unset).")
    replan: bool = Field(False, description="Discard labels in `out` made for another corpus or shard size.")
    label: LabelConfig = Field(default_factory=LabelConfig)
    tracking: TrackingConfig | None = Field(None, description="Log per-shard docs/s to MLflow (None: no tracking).")


class VocabJob(_Strict):
    """A standalone counting job (`sparse-distill vocab`): corpus files in, `OUT/vocab.parquet` out."""

    inputs: list[str] = Field(..., min_length=1, description="Corpus files: Parquet, JSONL, CSV/TSV or text; globs.")
    out: str = Field(..., description="Output directory: vocab.parquet, plus the spills and counts it resumes from.")
    text_column: str = Field("text", description="Column (or JSON key) holding the document text.")
    limit: int | None = Field(None, ge=1, description="Count only the first N documents of each file.")
    replan: bool = Field(False, description="Discard counts in `out` made for other inputs or settings.")
    keep_spills: bool = Field(False, description="Keep the per-shard spills once every partition is summed.")
    vocab: VocabConfig = Field(default_factory=VocabConfig)


class PipelineConfig(_Strict):
    """The whole pipeline: one section per stage."""

    name: str = Field("run", description="Run name; outputs go to runs/<name>/ unless --run-dir is given.")
    data: DataConfig
    teacher: TeacherConfig
    label: LabelConfig = Field(default_factory=LabelConfig)
    vocab: VocabConfig = Field(default_factory=VocabConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: TrainConfig = Field(default_factory=TrainConfig)
    finetune: TrainConfig = Field(
        default_factory=TrainConfig,
        description="KD+FT: the distilled student on the gold labels, with distillation's learning rates (by "
        "measurement: a gentle 2e-4 could not undo what a weak teacher taught; dev is scored before the first step, "
        "so fine-tuning only replaces the distilled student when it helps).",
    )
    scratch: TrainConfig = Field(default_factory=TrainConfig, description="The baseline: the DAN on gold labels only.")
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


# --- experiments (`sparse-distill experiment NAME CONFIG`) ---------------------------------------------------------


class PrivacyConfig(_Strict):
    """Distillation without the task's train data: KD on the corpus alone against KD on corpus + train."""

    vocab_from_corpus: bool = Field(
        True, description="Count the corpus-only student's vocabulary on the corpus alone (no train text at all)."
    )


class DomainConfig(_Strict):
    """Domain adaptation: a teacher fine-tuned on a source task labels the target corpus; the student is then
    fine-tuned on the target task, with and without re-initialising its dense layers."""

    source_pipeline: str | None = Field(None, description="Pipeline config (YAML) of the source task, e.g. sst2.yaml.")
    source_data_dir: str | None = Field(None, description="data.data_dir for the source pipeline.")
    source_run_dir: str | None = Field(None, description="Run dir of the source pipeline (default runs/<its name>).")
    corpus_limit: int | None = Field(10_000, ge=1, description="Target-corpus documents the source teacher labels.")
    label_max_length: int | None = Field(
        None, ge=8, description="Tokens per document when the source teacher labels (default: the source's)."
    )
    finetune: TrainConfig = Field(
        default_factory=lambda: TrainConfig(lr=2e-4, table_lr=None, batch_size=512, epochs=2, eval_every=50),
        description="Fine-tuning on the target train set.",
    )


class AblationConfig(_Strict):
    """The paper's ablations, each a KD run with the experiment's training budget."""

    poolings: list[Literal["mean", "max", "sum"]] = Field(["mean", "max", "sum"], description="Pooling variants.")
    orders: list[int] = Field([1, 2, 3, 4], description="N-gram orders used at inference by the mean-pooled student.")
    budgets: list[int] = Field([10_000_000], description="Table parameter budgets |V| x d of the grid.")
    dims: list[int] = Field([10, 25, 50, 100], description="Dimensions d of the grid; |V| = budget / d.")
    layers: list[int] = Field([1, 2, 3], description="Dense hidden layers after pooling.")
    teacher_init_vocab: int | None = Field(
        50_000, ge=1, description="|V| for the table initialised from the teacher (None: skip that ablation)."
    )
    teacher_init_batch_size: int = Field(512, ge=1, description="N-grams per teacher batch when encoding them.")


class BaselineConfig(_Strict):
    """Other students distilled from the same soft labels, and TF-IDF + logistic regression."""

    kinds: list[Literal["tfidf", "bilstm", "cnn"]] = Field(["tfidf", "bilstm", "cnn"], description="Baselines.")
    word_vocab: int = Field(30_000, ge=2, description="Word vocabulary of the Bi-LSTM and CNN students.")
    max_len: int = Field(256, ge=1, description="Words per document for the Bi-LSTM and CNN.")
    tfidf_c: float = Field(4.0, gt=0, description="Inverse regularisation C of the logistic regression.")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(lr=1e-3, batch_size=64, epochs=1, eval_every=200),
        description="Training of the Bi-LSTM and CNN students.",
    )


class WosConfig(_Strict):
    """Word-order sensitivity of the task, measured with the teacher on shuffled dev texts."""

    max_docs: int | None = Field(2000, ge=1, description="Dev documents used (a seeded sample when there are more).")
    seeds: list[int] = Field([13, 14, 15], min_length=1, description="Shuffling seeds; WOS is averaged over them.")


class MlpConfig(_Strict):
    """The blog's small MLP student over words, with and without distillation."""

    word_vocab: int = Field(5_000, ge=2, description="Word vocabulary size.")
    dim: int = Field(16, ge=1, description="Word embedding size.")
    hidden: int = Field(64, ge=1, description="Hidden layer size.")
    max_len: int = Field(256, ge=1, description="Words per document.")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(lr=3e-3, batch_size=128, epochs=5, eval_every=200),
        description="Training of both MLP variants.",
    )


class AugmentConfig(_Strict):
    """Distillation with no unlabelled corpus: the teacher labels augmented copies of train texts."""

    sample: int | None = Field(5_000, ge=1, description="Train texts augmented (a seeded sample; None: all).")
    per_text: int = Field(4, ge=1, description="Augmented copies per text and method.")
    methods: list[Literal["eda", "ngram"]] = Field(["eda", "ngram"], min_length=1, description="Augmentations.")
    alpha: float = Field(0.1, gt=0, le=1, description="EDA: share of words replaced, deleted or swapped.")


class CascadeConfig(_Strict):
    """The student answers when confident, the teacher takes the rest."""

    metric: Literal["max_prob", "margin"] = Field("max_prob", description="The student's confidence measure.")
    target_retention: float = Field(
        0.99, gt=0, le=1.5, description="Target accuracy as a share of the teacher's dev accuracy."
    )
    target_accuracy: float | None = Field(None, gt=0, le=1, description="Absolute target (overrides retention).")
    log_model: bool = Field(True, description="Log the cascade at the chosen threshold as an MLflow model.")


class ExperimentConfig(_Strict):
    """One experiment file: the base pipeline run the experiments build on, and a section per experiment."""

    pipeline: str = Field(..., description="The base pipeline config (YAML), e.g. configs/sst2.yaml.")
    pipeline_overrides: list[str] = Field(default_factory=list, description="key.path=value overrides of it.")
    data_dir: str | None = Field(None, description="data.data_dir of the base pipeline.")
    run_dir: str | None = Field(None, description="The base pipeline's run dir (default runs/<its name>).")
    out_dir: str | None = Field(None, description="Where results go (default runs/experiments/<its name>).")
    train: TrainConfig | None = Field(
        None, description="Training budget of every DAN variant (default: the pipeline's distill section)."
    )
    teacher_eval_docs: int | None = Field(
        2000, ge=1, description="Test documents the teacher is scored on (a seeded sample; students use all)."
    )
    speed_docs: int = Field(2000, ge=32, description="Documents timed per student (batch 32, one thread).")
    teacher_speed_docs: int = Field(256, ge=32, description="Documents timed for the teacher (batch 32).")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    domain: DomainConfig = Field(default_factory=DomainConfig)
    ablations: AblationConfig = Field(default_factory=AblationConfig)
    baselines: BaselineConfig = Field(default_factory=BaselineConfig)
    wos: WosConfig = Field(default_factory=WosConfig)
    mlp: MlpConfig = Field(default_factory=MlpConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    cascade: CascadeConfig = Field(default_factory=CascadeConfig)
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(experiment="sparse-distill-experiments", log_model=False)
    )


def load_experiment_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment file (unknown keys are errors); relative paths in it are taken from the working dir."""
    return _load_yaml_model(path, overrides, ExperimentConfig)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {item!r}: empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a pipeline config from YAML, apply overrides, validate (unknown keys are errors)."""
    return _load_yaml_model(path, overrides, PipelineConfig)


def _load_yaml_model(path: str | Path, overrides: list[str] | None, model: type[_M]) -> _M:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (is it a YAML config?)") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {format_validation_error(e)}") from e


def format_validation_error(e: ValidationError) -> str:
    """One line per problem, naming the field path."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def fingerprint(*parts: Any) -> str:
    """A stable short hash of JSON-able parts plus the library version: the base of every cache key."""
    blob = json.dumps([__version__, *[_jsonable(p) for p in parts]], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _jsonable(part: Any) -> Any:
    if isinstance(part, TrainConfig):
        return part.cache_dump()
    if isinstance(part, BaseModel):
        return part.model_dump(mode="json")
    return part
