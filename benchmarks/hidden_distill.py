"""Distilling the teacher's representation as well as its labels (an experiment, not a pipeline setting yet).

On a finished pipeline run, a student (`--members` DANs of `student.dim // members` columns each, merged as the
pipeline merges its members; one by default) is distilled on the run's own soft labels (the
train rows' and transfer texts' targets mixed with their gold labels, as the pipeline's `distill_stream` mixes them),
with the run's distill settings, and besides the loss on the teacher's logits it predicts, through a linear map from
its pooled vector, the fine-tuned teacher's pooled vector of each text (the input of the teacher's classifier,
standardised per dimension), weighted by each `--weights` value (0: the pipeline's loss alone). A two-class teacher's
logits say one number per text; its pooled vector says 384 (MiniLM's).

The teacher's vectors are computed once per run (every distillation text through the run's fine-tuned teacher; cached
beside the run folder as `<run>.teacher_vectors.npz`). The students live in memory; test accuracy of the best dev
checkpoint.

    python benchmarks/hidden_distill.py runs/bench-quality/sst2-1k --weights 0 5 --seeds 13 14 15
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sparse_distill.config import PipelineConfig
    from sparse_distill.pipeline import TaskData
    from sparse_distill.student import DanStudent
    from sparse_distill.training import InMemoryBatches
    from sparse_distill.vocab import NgramVocab

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("hidden_distill")


def vectors_fingerprint(model_dir: Path, texts: list[str], max_length: int, truncation: str) -> str:
    """What a cache of teacher vectors must have been made from: the teacher's folder, its length, how it cuts long
    texts and the texts."""
    key = hashlib.sha256()
    for part in [str(Path(model_dir).resolve()), str(max_length), truncation, *texts]:
        key.update(part.encode() + b"\0")
    return key.hexdigest()


def teacher_vectors(
    model_dir: Path, texts: list[str], max_length: int, cache: Path, batch_size: int = 256
) -> np.ndarray:
    """The fine-tuned teacher's pooled vector (its classifier's input) of each text, `[texts, hidden]` float32; read
    from `cache` (an .npz) when it holds those of the same texts, teacher and length, else computed (shortest texts
    first, for less padding) and written there."""
    import torch
    from transformers import AutoTokenizer

    from sparse_distill.teacher import load_teacher_model, padded_inputs, teacher_truncation

    # The teacher reads long texts the way it was fine-tuned to (head, or head and tail).
    truncation = teacher_truncation(model_dir)
    fingerprint = vectors_fingerprint(model_dir, texts, max_length, truncation)
    if cache.exists():
        with np.load(cache) as stored:
            if str(stored["fingerprint"]) == fingerprint:
                return stored["vectors"]
        logger.warning("%s: the vectors of other texts or another teacher; computing them again", cache)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = load_teacher_model(model_dir).eval().base_model
    order = np.argsort([len(t) for t in texts], kind="stable")
    vectors: np.ndarray | None = None
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            enc = padded_inputs(tokenizer, [texts[j] for j in idx], max_length, truncation, "cpu")
            out = base(**enc)
            # BERT-like models pool the first token through a dense layer (or take the mean, a teacher fine-tuned with
            # teacher.pooling mean); others give the first token's state.
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                pooled = out.last_hidden_state[:, 0]
            if vectors is None:
                vectors = np.zeros((len(texts), pooled.shape[1]), np.float32)
            vectors[idx] = pooled.float().numpy()
            if (i // batch_size) % 50 == 0:
                logger.info("teacher vectors: %d/%d texts (%.0f s)", i, len(texts), time.perf_counter() - start)
    assert vectors is not None
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, vectors=vectors, fingerprint=np.str_(fingerprint))
    tmp.rename(cache)
    return vectors


def distillation_set(run_dir: Path) -> tuple[list[str], np.ndarray]:
    """The run's distillation texts and their targets (the teacher's distribution mixed with gold labels by
    `distill.gold_weight`, as the pipeline's stream mixes them), in label-folder and file order."""
    from sparse_distill.config import load_config
    from sparse_distill.pipeline import distill_label_stages, gold_targets, load_task_data
    from sparse_distill.run_store import stage_dir
    from sparse_distill.soft_labels import iter_soft_labels

    cfg = load_config(run_dir / "config.yaml")
    data = load_task_data(cfg.data)
    label_dirs = [str(stage_dir(run_dir, s)) for s in distill_label_stages(cfg)]
    gold = gold_targets(cfg, data, label_dirs) if cfg.distill.gold_weight > 0 else {}
    texts: list[str] = []
    targets = []
    for d in label_dirs:
        probs = []
        for shard_texts, shard_probs in iter_soft_labels(d):
            texts += shard_texts
            probs.append(shard_probs)
        folder = np.concatenate(probs)
        if d in gold:
            weight = cfg.distill.gold_weight * (gold[d].sum(axis=1, keepdims=True) > 0)
            folder = (1 - weight) * folder + weight * gold[d]
        targets.append(folder.astype(np.float32))
    return texts, np.concatenate(targets)


@dataclass
class DistillationSet:
    """A finished run, loaded once: its config, task data and vocabulary, and its distillation texts' n-gram ids
    (`featurized`), targets and standardised teacher vectors, in one order."""

    run_dir: Path
    cfg: PipelineConfig
    data: TaskData
    vocab: NgramVocab
    featurized: InMemoryBatches
    targets: np.ndarray
    vectors: np.ndarray

    @classmethod
    def load(cls, run_dir: Path) -> DistillationSet:
        """The run's distillation set, its teacher vectors read from (or computed into) the cache beside the run."""
        from sparse_distill.config import load_config
        from sparse_distill.pipeline import load_task_data
        from sparse_distill.run_store import stage_dir
        from sparse_distill.training import InMemoryBatches
        from sparse_distill.vocab import NgramVocab

        cfg = load_config(run_dir / "config.yaml")
        texts, targets = distillation_set(run_dir)
        logger.info("%s: %d distillation texts", run_dir, len(texts))
        cache = run_dir.parent / f"{run_dir.name}.teacher_vectors.npz"
        vectors = teacher_vectors(run_dir / "teacher" / "model", texts, cfg.teacher.max_length, cache)
        vectors = (vectors - vectors.mean(axis=0)) / (vectors.std(axis=0) + 1e-6)
        vocab = NgramVocab.load(stage_dir(run_dir, "vocab"))
        # Featurised once for every seed and weight.
        featurized = InMemoryBatches(texts, targets).featurized(vocab)
        return cls(run_dir, cfg, load_task_data(cfg.data), vocab, featurized, targets, vectors)


def train_member(dataset: DistillationSet, weight: float, seed: int, dim: int) -> tuple[DanStudent, float]:
    """One DAN of width `dim` distilled on `dataset` with the teacher's vectors at `weight`: its best dev checkpoint and
    that checkpoint's dev accuracy."""
    import torch
    import torch.nn.functional as F

    from sparse_distill.dan_config import DanConfig
    from sparse_distill.student import DanStudent
    from sparse_distill.training import InMemoryBatches, accuracy, fit, logit_mse_loss, make_optimizers, to_tensors

    cfg, data, targets, vectors = dataset.cfg, dataset.data, dataset.targets, dataset.vectors
    classes = targets.shape[1]
    train_cfg = cfg.distill.model_copy(
        update={"seed": seed, "checkpoint_every_minutes": None, "checkpoint_every_steps": None}
    )
    torch.manual_seed(seed)
    shape = DanConfig(
        len(dataset.vocab), classes, dim, cfg.student.hidden, cfg.student.pooling, init_std=cfg.student.init_std
    )
    model = DanStudent(shape)
    # The map from the pooled vector to the teacher's: trained with the dense layers, dropped after training.
    to_teacher = torch.nn.Linear(dim, vectors.shape[1])
    optimizers = make_optimizers(model, train_cfg.lr, train_cfg.table_lr, train_cfg.table_optimizer)
    optimizers[1].add_param_group({"params": list(to_teacher.parameters()), "lr": train_cfg.lr})
    joined = np.concatenate([targets, vectors], axis=1)
    batches = InMemoryBatches(dataset.featurized.texts, joined, seed, dataset.featurized.docs)
    dev_ids, dev_offsets = to_tensors(dataset.vocab, data.dev.texts)
    dev_y = np.asarray(data.encoded(data.dev))
    best: dict = {}

    def step(batch: tuple) -> torch.Tensor:
        docs, both = batch
        model.train()
        pooled = model.pool(torch.from_numpy(np.asarray(docs.ids, np.int64)), torch.from_numpy(docs.offsets))
        both = torch.from_numpy(np.asarray(both, np.float32))
        loss = logit_mse_loss(model.head(pooled), both[:, :classes])
        if weight > 0:
            loss = loss + weight * F.mse_loss(to_teacher(pooled), both[:, classes:])
        return loss

    def save() -> None:
        best["state"] = copy.deepcopy(model.state_dict())

    with model.table_updated_in_backward(optimizers[0]):
        result = fit(
            optimizers,
            step,
            lambda: accuracy(model, dev_ids, dev_offsets, dev_y),
            save,
            batches,
            train_cfg,
            name=f"weight {weight:g} seed {seed}",
        )
    model.load_state_dict(best["state"])
    return model, result.best_dev_accuracy


def run_one(dataset: DistillationSet, weight: float, seed: int, members: int) -> dict:
    """A student of `members` DANs (each `student.dim // members` wide, with seeds `seed`, `seed + 1`, ..., as the
    pipeline trains its members), each distilled with the teacher's vectors at `weight`, merged as the pipeline merges
    them (`merge_members`: the mean of their probabilities) and scored on dev and test."""
    from sparse_distill.student import merge_members
    from sparse_distill.training import accuracy, to_tensors

    data = dataset.data
    scored = data.test if data.test is not None else data.dev
    start = time.perf_counter()
    trained = [train_member(dataset, weight, seed + i, dataset.cfg.student.dim // members) for i in range(members)]
    student = merge_members([model for model, _ in trained])
    scores = {
        name: round(accuracy(student, *to_tensors(dataset.vocab, split.texts), np.asarray(data.encoded(split))), 4)
        for name, split in {"dev": data.dev, "test": scored}.items()
    }
    return {
        "run": dataset.run_dir.name,
        "weight": weight,
        "seed": seed,
        "members": members,
        "member_dev": [round(dev, 4) for _, dev in trained],
        **scores,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path, help="Finished pipeline runs (runs/<name>).")
    p.add_argument("--weights", nargs="+", type=float, default=[0.0, 5.0], help="Weights of the teacher's vectors.")
    p.add_argument("--seeds", nargs="+", type=int, default=[13, 14, 15])
    p.add_argument("--members", type=int, default=1, help="DANs per student (the pipeline's student.members: 3).")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hidden_distill.json")
    args = p.parse_args()
    rows = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    for run_dir in args.run_dirs:
        dataset = DistillationSet.load(run_dir)
        for seed in args.seeds:
            for weight in args.weights:
                row = run_one(dataset, weight, seed, args.members)
                print(json.dumps(row), flush=True)
                key = (row["run"], weight, seed, args.members)
                rows = [r for r in rows if (r["run"], r["weight"], r["seed"], r.get("members", 1)) != key] + [row]
    summary = []
    for run, members, weight in sorted({(r["run"], r.get("members", 1), r["weight"]) for r in rows}):
        mine = [r for r in rows if (r["run"], r.get("members", 1), r["weight"]) == (run, members, weight)]
        mean = {k: round(sum(r[k] for r in mine) / len(mine), 4) for k in ("dev", "test")}
        seeds = sorted(r["seed"] for r in mine)
        summary.append({"run": run, "members": members, "weight": weight, "seeds": seeds, **mean})
        print(
            f"{run:18s} members {members} weight {weight:<5g} dev {mean['dev']:.4f}  test {mean['test']:.4f}  {seeds}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": rows, "mean": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
