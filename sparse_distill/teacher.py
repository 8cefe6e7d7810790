"""The transformer teacher: fine-tuning on the train set and batched soft-label prediction."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sparse_distill.config import TeacherConfig, fingerprint
from sparse_distill.data import LabelMap, atomic_write, atomic_write_text, write_dir_atomically
from sparse_distill.training import Budget

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]

# Fine-tuning logs its step, loss and time left at least this often, so a run with few evaluations (a CPU teacher on
# long reviews can go tens of minutes between two) still shows that it moves.
PROGRESS_SECONDS = 60.0

# The default budget (`epochs` unset): enough passes to see about `budget_texts` train texts, within 1 to
# TEACHER_MAX_EPOCHS. One pass over a small train set under-trains the teacher: on 12k sentences in 6 classes
# (sotu-eras) dev accuracy was 0.535 after one pass and 0.608 after two, and the student cannot learn what its
# teacher has not.
TEACHER_MAX_EPOCHS = 5.0
TEACHER_EVALS = 6  # dev evaluations per budget by default (at most one a pass): the best one is kept


def plan_teacher_budget(num_docs: int, config: TeacherConfig) -> Budget:
    """The teacher's step budget: `epochs` when set, else derived from the data size (`budget_texts`)."""
    per_epoch = max(1, math.ceil(num_docs / config.batch_size))
    if config.epochs is not None:
        epochs, reason = config.epochs, "epochs set"
    else:
        epochs = min(TEACHER_MAX_EPOCHS, max(1.0, config.budget_texts / max(num_docs, 1)))
        reason = (
            f"auto: {epochs:.1f} passes over {num_docs:,} texts ({config.budget_texts:,} texts seen, within "
            f"1-{TEACHER_MAX_EPOCHS:g} passes)"
        )
    steps = max(1, math.ceil(per_epoch * epochs))
    eval_every = config.eval_every or max(1, min(per_epoch, math.ceil(steps / TEACHER_EVALS)))
    return Budget(steps, eval_every, epochs, reason)


# max_length "auto": long enough for this share of the train texts and of the dev texts, counted on a sample of each,
# rounded up to a step of LENGTH_STEP tokens (at least one step). The 90th percentile rather than the longest text: a
# few long outliers should not set the cost of every batch, and head_tail keeps both ends of what is cut.
LENGTH_SHARE = 0.9
LENGTH_STEP = 32
LENGTH_SAMPLE = 2000


def covering_length(tokenizer, texts: list[str], share: float = LENGTH_SHARE, cap: int = 512) -> int:
    """The number of tokens (special tokens included) within which `share` of `texts` fit, counted up to cap + 1
    (a text longer than that only needs to count as too long)."""
    if not texts:
        return 0
    keep = (cap + 1) * _CHARS_PER_TOKEN_BOUND  # a long document's tail cannot change whether it passes the cap
    enc = tokenizer([t[:keep] for t in texts], truncation=True, max_length=cap + 1)
    lengths = np.array([len(ids) for ids in enc["input_ids"]])
    return int(np.ceil(np.quantile(lengths, share)))


def model_token_limit(model: str, tokenizer) -> int | None:
    """The most tokens `model` reads: its tokenizer's model_max_length where set (512 for BERT and RoBERTa), else its
    config's max_position_embeddings; None when neither says."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 1_000_000:  # tokenizers without a limit report a huge number
        return limit
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)


def auto_max_length(tokenizer, splits: dict[str, list[str]], cap: int) -> tuple[int, str]:
    """`teacher.max_length` "auto": the length within which LENGTH_SHARE of each split's texts fit, the longest of
    the splits, rounded up to a multiple of LENGTH_STEP, within LENGTH_STEP..cap; with the reason in words."""
    needs = {name: covering_length(tokenizer, texts, cap=cap) for name, texts in splits.items() if texts}
    need = max(needs.values(), default=LENGTH_STEP)
    length = min(cap, max(LENGTH_STEP, math.ceil(need / LENGTH_STEP) * LENGTH_STEP))
    fits = " and ".join(
        f"of the {name} texts within {n:,} tokens" if n <= cap else f"of the {name} texts within more than {cap:,}"
        for name, n in needs.items()
    )
    reason = f"auto: {LENGTH_SHARE:.0%} {fits}"
    if need > cap:
        reason += f", so teacher.max_length_cap {cap:,} (longer texts are cut: teacher.truncation)"
    else:
        reason += f", rounded up to a multiple of {LENGTH_STEP}"
    return length, reason


# Where a teacher folder records how it was fine-tuned (written with its weights, read by every consumer).
TRAINING_INFO = "training_info.json"
# A long document's characters kept at each end before tokenising for head_tail: far more than the tokens kept (no
# tokenizer packs 16 characters into one token), so the tokens are those of the whole text, at a bounded cost.
_CHARS_PER_TOKEN_BOUND = 16


def tokenize(tokenizer, texts: list[str], max_length: int, truncation: str = "head") -> dict[str, list[list[int]]]:
    """Token ids (and token type ids, where the tokenizer has them) of each text, special tokens included, at most
    `max_length` per text: `head` keeps the first ones; `head_tail` the first half and the last half, so the
    opening special token and the closing one both stay (TeacherConfig.truncation)."""
    keys = ("input_ids", "token_type_ids")
    if truncation == "head":
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        return {k: enc[k] for k in keys if k in enc}
    if truncation != "head_tail":
        raise ValueError(f"unknown truncation {truncation!r} (head, head_tail)")
    keep = max_length * _CHARS_PER_TOKEN_BOUND
    texts = [t if len(t) <= 2 * keep else f"{t[:keep]} {t[-keep:]}" for t in texts]
    enc = tokenizer(texts, truncation=False, verbose=False)
    return {k: [_head_tail(list(ids), max_length) for ids in enc[k]] for k in keys if k in enc}


def _head_tail(ids: list[int], max_length: int) -> list[int]:
    """The first max_length // 2 ids and the last of the rest, or all of them when they fit."""
    head = max_length // 2
    return ids if len(ids) <= max_length else ids[:head] + ids[len(ids) - (max_length - head) :]


def padded_inputs(tokenizer, texts: list[str], max_length: int, truncation: str, device: str) -> dict:
    """A batch of texts as padded model inputs on `device` (see `tokenize`)."""
    enc = tokenizer.pad(tokenize(tokenizer, texts, max_length, truncation), return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def training_info(model_dir: str | Path) -> dict:
    """What the teacher folder records about its fine-tuning (dev accuracy, step, max_length, truncation); empty for
    a folder that does not say (a checkpoint from elsewhere)."""
    info = Path(model_dir) / TRAINING_INFO
    return json.loads(info.read_text()) if info.exists() else {}


def teacher_truncation(model_dir: str | Path) -> str:
    """How the teacher in `model_dir` was fine-tuned to cut long documents; `head` for a folder that does not say (a
    checkpoint from elsewhere, or a teacher fine-tuned before this was recorded)."""
    value = training_info(model_dir).get("truncation")
    return value if value in ("head", "head_tail") else "head"


class MaskedMeanPooler(torch.nn.Module):
    """Stands in for a BERT-style pooler: the mean of the last hidden states over the tokens the attention mask keeps
    (all of them when the call had no mask). The mask reaches it through `_pass_mask_to_pooler`, a hook on the
    encoder, since a pooler is called with the hidden states alone."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(1)
        mask = self.mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * mask).sum(1) / mask.sum(1).clamp_min(1)


def _pass_mask_to_pooler(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    # A module-level function, not a closure: a deep copy of the model (int8 quantisation makes one) keeps a hook that
    # finds the copy's own pooler.
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    module.pooler.mask = mask


def has_bert_pooler(model) -> bool:
    """Whether the model's classifier reads a BERT-style pooler on its encoder (`base_model.pooler`)."""
    return isinstance(getattr(model.base_model, "pooler", None), torch.nn.Module)


def resolve_pooling(pooling: str, model) -> str:
    """`TeacherConfig.pooling` for this model: auto is mean where there is a BERT-style pooler to replace."""
    if pooling == "auto":
        return "mean" if has_bert_pooler(model) else "model"
    if pooling == "mean" and not has_bert_pooler(model):
        raise ValueError(
            f"teacher.pooling mean needs a model whose classifier reads a BERT-style pooler (BERT, MiniLM, ...); "
            f"{type(model).__name__} has none: set teacher.pooling to model or auto"
        )
    return pooling


def use_mean_pooling(model) -> None:
    """Replace the model's BERT-style pooler with `MaskedMeanPooler`, in place."""
    base = model.base_model
    base.pooler = MaskedMeanPooler()
    base.register_forward_pre_hook(_pass_mask_to_pooler, with_kwargs=True)


def load_teacher_model(model_dir: str | Path):
    """The sequence classifier in `model_dir`, with the head it was fine-tuned with (`training_info`'s pooling)."""
    if training_info(model_dir).get("pooling") != "mean":
        return AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    from transformers.utils import logging as hf_logging

    # The folder has no pooler weights, by design: transformers' report of them as missing would only mislead.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    finally:
        hf_logging.set_verbosity(verbosity)
    use_mean_pooling(model)
    return model


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (less padding), in sorted order."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


class TeacherPredictor:
    """A fine-tuned sequence classifier with its tokenizer: raw texts in, logits out.

    Texts are tokenised once, sorted by token count and batched, so each batch pads only to its own longest text.
    `precision` picks autocast (bf16 on a GPU or a CPU with bf16 instructions, fp16 on a GPU; 'auto' is bf16 on a
    GPU and on a CPU with bf16 instructions, fp32 elsewhere); `quantize_int8`
    applies dynamic int8 quantisation to the Linear layers on a CPU (faster; probabilities move slightly).
    """

    def __init__(
        self,
        model_dir: str | Path,
        max_length: int = 128,
        device: str | None = None,
        precision: str = "auto",
        quantize_int8: bool = False,
        truncation: str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        # Long documents are cut the way the teacher was fine-tuned on them unless the caller says otherwise.
        self.truncation = truncation or teacher_truncation(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = load_teacher_model(model_dir)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        if quantize_int8:
            if not self.device.startswith("cpu"):
                raise ValueError("dynamic int8 quantisation runs on a CPU only; use precision bf16/fp16 on a GPU")
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self.max_length = max_length
        self.autocast_dtype = _autocast_dtype(precision, self.device, quantize_int8)
        self.pad_id = self.tokenizer.pad_token_id or 0

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    @torch.inference_mode()
    def predict_logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Logits in input order; batches are formed by token count to cut padding."""
        out = np.zeros((len(texts), self.num_labels), np.float32)
        if not texts:
            return out
        enc = tokenize(self.tokenizer, texts, self.max_length, self.truncation)
        ids = enc["input_ids"]
        types = enc.get("token_type_ids")
        for batch in length_sorted_batches([len(x) for x in ids], batch_size):
            width = max(len(ids[i]) for i in batch)
            input_ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            inputs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
            if types is not None:
                tt = np.zeros((len(batch), width), dtype=np.int64)
                for row, i in enumerate(batch):
                    tt[row, : len(types[i])] = types[i]
                inputs["token_type_ids"] = torch.from_numpy(tt)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            dtype = self.autocast_dtype
            with torch.autocast(self.device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = self.model(**inputs).logits
            out[batch] = logits.float().cpu().numpy()
        return out

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities in input order."""
        return torch.softmax(torch.from_numpy(self.predict_logits(texts, batch_size)), dim=-1).numpy()

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 256, progress_every: int = 100_000) -> np.ndarray:
        """Each text's mean-pooled last hidden state from the teacher's encoder (no classifier head).

        Used to initialise the student's n-gram table from the teacher: every n-gram's text is encoded on its own.
        """
        encoder = self.model.base_model
        out = np.zeros((len(texts), int(self.model.config.hidden_size)), np.float32)
        done = 0
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = padded_inputs(self.tokenizer, chunk, self.max_length, self.truncation, self.device)
            hidden = encoder(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out[start : start + len(chunk)] = ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu().numpy()
            done += len(chunk)
            if done // progress_every != (done - len(chunk)) // progress_every:
                logger.info("encoded %d of %d texts with the teacher", done, len(texts))
        return out


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 autocast labels 2-3 times faster
    than fp32; elsewhere it is emulated and slower."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


def _autocast_dtype(precision: str, device: str, quantize_int8: bool = False) -> torch.dtype | None:
    on_gpu = device.startswith("cuda")
    if precision == "auto":
        # The fastest numerics whose probabilities stay within about 0.01 of fp32; int8 layers run as they are.
        return torch.bfloat16 if on_gpu or (not quantize_int8 and cpu_has_bf16()) else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16  # on a CPU too: fast where it has bf16 instructions (AVX512-BF16, AMX)
    if precision == "fp16":
        if not on_gpu:
            raise ValueError("precision 'fp16' is for a GPU; on a CPU use fp32 or bf16")
        return torch.float16
    raise ValueError(f"unknown precision {precision!r} (auto, fp32, bf16, fp16)")


def teacher_word_vectors(model_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """The whole words of the teacher's tokenizer (see `whole_words`) with their input-embedding vectors, for the
    transfer set's neighbour replacement and one-word texts."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    table = input_embeddings(model_dir)
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    pairs = [(w, i) for w, i in whole_words(tokens) if i < len(table)]
    logger.info("teacher vocabulary: %d whole words of %d tokens", len(pairs), len(tokens))
    return [w for w, _ in pairs], table[[i for _, i in pairs]]


def input_embeddings(model_dir: str | Path) -> np.ndarray:
    """The teacher's input-embedding table (float32, one row per token id). Read alone from the model folder's
    safetensors files when it has them (a RoBERTa-large's 200 MB table without its 1.4 GB of other weights); otherwise,
    as for a hub name, from the whole model loaded."""
    from safetensors import safe_open
    from transformers import AutoConfig

    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if files:
        # The table's parameter name, from the architecture built without memory; a backbone's own checkpoint (as
        # sentence-transformers ship it) stores it without the task model's prefix ("bert.").
        with torch.device("meta"):
            skeleton = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(str(model_dir)))
        weight = skeleton.get_input_embeddings().weight
        name = next(n for n, p in skeleton.named_parameters() if p is weight)
        for path in files:
            with safe_open(str(path), framework="pt") as stored:
                keys = set(stored.keys())
                for key in (name, name.split(".", 1)[-1]):
                    if key in keys:
                        return stored.get_tensor(key).float().numpy()
        logger.info("%s: no %s in its safetensors files; loading the whole model for it", model_dir, name)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    return model.get_input_embeddings().weight.detach().float().cpu().numpy()


def whole_words(tokens: list[str]) -> list[tuple[str, int]]:
    """(word, token id) for each token of a vocabulary (`tokens[i]` is id i) that is a whole word the student's
    tokeniser would keep: lower-cased, alphabetic, two letters or more.

    Whole words are WordPiece tokens without the `##` continuation mark, or, in a byte-level BPE / SentencePiece
    vocabulary, tokens that start a word (`Ġ` / `▁`); a word in several casings keeps its first (most frequent) id.
    """
    marks = [m for m in ("Ġ", "▁") if sum(t.startswith(m) for t in tokens) > len(tokens) // 10]
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    for row, token in enumerate(tokens):
        if marks:
            if not token.startswith(marks[0]):
                continue
            token = token[len(marks[0]) :]
        elif token.startswith("##"):
            continue
        word = token.lower()
        if len(word) < 2 or not word.isalpha() or word in seen:
            continue
        seen.add(word)
        out.append((word, row))
    return out


def teacher_fingerprint(model_dir: str | Path) -> str:
    """Hash of the teacher's weights and config files: which teacher produced a set of soft labels."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(Path(model_dir).iterdir()):
        if p.is_file() and p.suffix in (".safetensors", ".json", ".bin", ".txt", ".model"):
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
            with p.open("rb") as f:
                # Head and tail of each file: cheap on GB checkpoints, still changes with any retraining.
                h.update(f.read(1 << 20))
                f.seek(max(0, p.stat().st_size - (1 << 20)))
                h.update(f.read())
    return h.hexdigest()[:16]


@dataclass
class TeacherResult:
    """What fine-tuning produced."""

    model_dir: str
    dev_accuracy: float
    best_step: int
    steps: int
    seconds: float
    budget: str


def sample_rows(n_rows: int, size: int, seed: int) -> list[int]:
    """Row numbers of a seeded random sample of `size` rows (all rows when there are fewer), in file order.

    A sample, not the first rows: train files are often sorted by label (IMDB's is)."""
    if size >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), size))


def finetune_teacher(
    config: TeacherConfig,
    train_texts: list[str],
    train_labels: list[int],
    dev_texts: list[str],
    dev_labels: list[int],
    label_map: LabelMap,
    out_dir: str | Path,
    on_metrics: MetricsCallback | None = None,
) -> TeacherResult:
    """Fine-tune a sequence classifier; keep the checkpoint with the best dev accuracy (safetensors + tokenizer)."""
    out_dir = Path(out_dir)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    id2label = {i: str(v) for i, v in enumerate(label_map.labels)}
    model = AutoModelForSequenceClassification.from_pretrained(
        config.model,
        num_labels=label_map.num_classes,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        ignore_mismatched_sizes=True,  # a checkpoint fine-tuned on another task brings a head of another size
    )
    if config.skip_finetune:  # a checkpoint used as it is keeps the head it was trained with (ours record it)
        pooling = training_info(config.model).get("pooling", "model")
    else:
        pooling = resolve_pooling(config.pooling, model)
    if pooling == "mean":
        use_mean_pooling(model)
    model.to(device)
    config = config.model_copy(update={"pooling": pooling})
    if config.max_train_samples is not None:
        keep = sample_rows(len(train_texts), config.max_train_samples, config.seed)
        train_texts, train_labels = [train_texts[i] for i in keep], [train_labels[i] for i in keep]
    start = time.perf_counter()
    best_dir = out_dir / "model"
    if config.skip_finetune:
        acc = _dev_accuracy(model, tokenizer, dev_texts, dev_labels, config, device)
        _save_checkpoint(model, tokenizer, best_dir, label_map, _training_info(config, acc, 0))
        seconds = time.perf_counter() - start
        return TeacherResult(str(best_dir), acc, 0, 0, seconds, "none: the checkpoint as it is (skip_finetune)")

    # Length-grouped batches, shuffled as whole batches: far less padding, still a random order per epoch.
    lengths = [len(t) for t in train_texts]
    budget = plan_teacher_budget(len(train_texts), config)
    total_steps, eval_every = budget.steps, budget.eval_every
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(total_steps * config.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(1, warmup), max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    )
    best_acc, best_step, step = -1.0, 0, 0
    rng = random.Random(config.seed)
    state_path = out_dir / RESUME_DIR / RESUME_STATE
    setup = _setup_key(config, train_texts, train_labels, label_map)
    skip = 0  # batches of the current pass already trained on before a resume
    resumed = _load_state(state_path, setup)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        step, best_acc, best_step, skip = (
            resumed["step"],
            resumed["best_acc"],
            resumed["best_step"],
            resumed["position"],
        )
        _set_rng_states(rng, resumed)
        logger.warning(
            "resuming teacher fine-tuning at step %d of %d (best dev accuracy so far %.4f) from %s",
            step,
            total_steps,
            best_acc,
            state_path,
        )
    logger.info(
        "fine-tuning teacher %s: %d docs, %d steps, dev every %d (%s)",
        config.model,
        len(train_texts),
        total_steps,
        eval_every,
        budget.reason,
    )
    first_step = step
    loop_start = last_log = time.perf_counter()
    while step < total_steps:
        pass_rng = rng.getstate()  # the pass's batches are drawn from here: a resume draws the same ones again
        batches = _bucketed_batches(lengths, config.batch_size, rng)
        for position, batch in enumerate(batches):
            if position < skip:
                continue
            if step >= total_steps:
                break
            model.train()
            enc = padded_inputs(
                tokenizer, [train_texts[i] for i in batch], config.max_length, config.truncation, device
            )
            labels = torch.tensor([train_labels[i] for i in batch], device=device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(**enc, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0 and on_metrics:
                on_metrics(step, {"teacher_train_loss": loss.item()})
            if time.perf_counter() - last_log >= PROGRESS_SECONDS and step < total_steps:
                last_log = time.perf_counter()
                _log_progress(step, first_step, total_steps, loss.item(), last_log - loop_start)
            if step % eval_every == 0 or step == total_steps:
                acc = _dev_accuracy(model, tokenizer, dev_texts, dev_labels, config, device)
                logger.info("teacher step %d/%d: loss %.4f, dev accuracy %.4f", step, total_steps, loss.item(), acc)
                if on_metrics:
                    on_metrics(step, {"teacher_dev_accuracy": acc})
                if acc > best_acc:
                    best_acc, best_step = acc, step
                    _save_checkpoint(
                        model,
                        tokenizer,
                        best_dir,
                        label_map,
                        _training_info(config, acc, step),
                    )
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                _save_state(
                    state_path,
                    model,
                    optimizer,
                    scheduler,
                    {"step": step, "best_acc": best_acc, "best_step": best_step, "position": position + 1},
                    pass_rng,
                    setup,
                )
        skip = 0
    shutil.rmtree(out_dir / RESUME_DIR, ignore_errors=True)  # finished: nothing to resume
    seconds = time.perf_counter() - start
    return TeacherResult(str(best_dir), best_acc, best_step, step, seconds, budget.describe())


# --- resuming fine-tuning: the training state every `checkpoint_every` steps ----------------------------------------
#
# OUT/resume/state.pt holds the weights, the optimizer and scheduler states, the step, the position in the current
# pass, the best dev accuracy so far, and every random state (the pass's batch order, torch, numpy, Python), so a run
# killed at any moment resumes from the last state and goes on as if it had never stopped. It is written atomically
# (a kill mid-write leaves the previous one), read with `weights_only=True` (no pickled code), used only for the same
# config, data and labels (`_setup_key`), and deleted when training finishes.

RESUME_DIR = "resume"
RESUME_STATE = "state.pt"


def _setup_key(config: TeacherConfig, texts: list[str], labels: list[int], label_map: LabelMap) -> str:
    exact = config.cache_dump()
    data = fingerprint(len(texts), texts[:100], texts[-100:], labels)
    return fingerprint("teacher-resume", exact, data, [str(v) for v in label_map.labels])


def _save_state(path: Path, model, optimizer, scheduler, progress: dict, pass_rng: tuple, setup: str) -> None:
    np_state = np.random.get_state()
    state = {
        **progress,
        "setup": setup,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        # Plain tensors, lists and numbers only, so that loading needs no unpickling of arbitrary objects.
        "pass_rng": [pass_rng[0], list(pass_rng[1]), pass_rng[2]],
        "python_rng": (lambda st: [st[0], list(st[1]), st[2]])(random.getstate()),
        "numpy_rng": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    logger.info("teacher: training state at step %d saved to %s", progress["step"], path)


def _load_state(path: Path, setup: str) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable state only costs the steps since the start
        logger.warning("%s: unreadable training state, starting from step 0 (%s)", path, e)
        return None
    if state.get("setup") != setup:
        logger.warning("%s: saved for another config or train set, starting from step 0", path)
        return None
    return state


def _set_rng_states(rng: random.Random, state: dict) -> None:
    version, internal, gauss = state["pass_rng"]
    rng.setstate((version, tuple(internal), gauss))
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    # Shuffle, sort within windows of 50 batches by length, then shuffle the batches.
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * 50
    batches = []
    for w in range(0, len(idx), window):
        chunk = sorted(idx[w : w + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def _log_progress(step: int, first_step: int, total_steps: int, loss: float, seconds: float) -> None:
    # The rate counts only this process's steps: a resumed run's earlier steps took no time here.
    rate = (step - first_step) / max(seconds, 1e-9)
    left = (total_steps - step) / rate if rate > 0 else float("inf")
    logger.info(
        "teacher step %d/%d (%.0f%%): loss %.4f, %.2f steps/s, about %.0f min left",
        step,
        total_steps,
        100 * step / total_steps,
        loss,
        rate,
        left / 60,
    )


@torch.inference_mode()
def _dev_accuracy(model, tokenizer, texts: list[str], labels: list[int], config: TeacherConfig, device: str) -> float:
    model.eval()
    correct = 0
    for batch in length_sorted_batches([len(t) for t in texts], config.eval_batch_size):
        enc = padded_inputs(tokenizer, [texts[i] for i in batch], config.max_length, config.truncation, device)
        pred = model(**enc).logits.argmax(-1).cpu().numpy()
        correct += int((pred == np.asarray([labels[i] for i in batch])).sum())
    return correct / max(1, len(texts))


def _training_info(config: TeacherConfig, dev_accuracy: float, step: int) -> dict:
    """What the teacher folder records about its fine-tuning: its consumers read how it cuts long documents here."""
    return {
        "dev_accuracy": dev_accuracy,
        "step": step,
        "max_length": config.max_length,
        "truncation": config.truncation,
        "pooling": config.pooling,
    }


def _save_checkpoint(model, tokenizer, out_dir: Path, label_map: LabelMap, info: dict) -> None:
    # Replaced as a whole folder: a crash at any moment leaves the previous best checkpoint or this one, never neither.
    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        label_map.save(tmp / "label_map.json")
        atomic_write_text(tmp / TRAINING_INFO, json.dumps(info, indent=2))

    write_dir_atomically(out_dir, write)
