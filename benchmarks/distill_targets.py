"""Distillation targets and loss: on a finished pipeline run, the KD student (and KD+FT from it) trained again with the
train rows' (and their transfer texts') targets mixed with their gold labels at several weights (`distill.gold_weight`;
`--transfer-weights` sets the transfer texts' apart), with each distillation loss asked for (`distill.loss`: kl,
logit_mse), over several seeds; with `--scratch`, the run's DAN from scratch too, with the same seeds, so a student's
spread stands beside the baseline's.

It reads the run's own soft labels, stored n-gram ids and vocabulary, and trains through the pipeline's code
(`pipeline.distill_stream`, `train_dan`, `pipeline.run_finetune_student`), so only the targets differ between rows.
Test accuracy.

    python benchmarks/distill_targets.py runs/bench-quality/rotten-tomatoes --weights 0 0.5 1 --seeds 13 14 15
    python benchmarks/distill_targets.py runs/bench-quality/sst2 --weights 0.5 --losses kl logit_mse
    python benchmarks/distill_targets.py runs/bench-quality/spam-assassin --weights 0.5 --seeds 13 14 --scratch
    python benchmarks/distill_targets.py runs/bench-quality/rotten-tomatoes --weights 0.5 --transfer-weights 0 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sparse_distill.data import TextSplit
    from sparse_distill.pipeline import TaskData

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_accuracy(model_dir: str, texts: list[str], labels: list[int]) -> float:
    """Test accuracy of a saved student."""
    import numpy as np

    from sparse_distill.student import load_student
    from sparse_distill.training import accuracy, to_tensors
    from sparse_distill.vocab import NgramVocab

    model, _ = load_student(model_dir)
    ids, offsets = to_tensors(NgramVocab.load(Path(model_dir)), texts)
    return accuracy(model, ids, offsets, np.asarray(labels))


def held_out(data: TaskData) -> TextSplit:
    """The split the students are scored on: test where the run has one, else dev."""
    return data.test if data.test is not None else data.dev


def seeded(seed: int) -> dict:
    """A training section's update: `seed`, and no checkpoints (a student here is trained once, start to end)."""
    return {"seed": seed, "checkpoint_every_minutes": None, "checkpoint_every_steps": None}


def transfer_weighted(gold: dict, label_dirs: list[str], weight: float, transfer_weight: float) -> dict:
    """`gold` (as `pipeline.gold_targets` gives it) with the transfer texts' gold labels at `transfer_weight` while the
    stream mixes at `weight`: their rows become `teacher + (transfer_weight / weight) * (gold - teacher)`, which the
    stream's mix turns into `(1 - transfer_weight) * teacher + transfer_weight * gold`."""
    import numpy as np

    from sparse_distill.pipeline import TRANSFER_FILE
    from sparse_distill.soft_labels import SHARDS, read_manifest, read_soft_labels

    out = dict(gold)
    for d in label_dirs:
        plan = read_manifest(d)
        if d not in gold or Path(plan.sources[0].path).name != TRANSFER_FILE:
            continue
        teacher = np.zeros_like(gold[d])
        for shard in plan.shards:
            teacher[shard.start : shard.stop] = read_soft_labels(Path(d) / SHARDS / shard.name)[1]
        has = gold[d].sum(axis=1, keepdims=True) > 0
        out[d] = np.where(has, teacher + (transfer_weight / weight) * (gold[d] - teacher), 0.0).astype(np.float32)
    return out


def run_one(
    run_dir: Path,
    weight: float,
    seed: int,
    out: Path,
    loss: str | None = None,
    overrides: list[str] | None = None,
    transfer_weight: float | None = None,
) -> dict:
    """KD at `weight` with `loss` (None: the config's), then KD+FT from it, both with `seed`; the run's config
    otherwise, with `overrides` (`section.field=value`, as `sparse-distill run --set`) applied. `transfer_weight`:
    the transfer texts' gold labels at this weight instead of `weight` (which must then be above 0)."""
    from sparse_distill.config import load_config
    from sparse_distill.features import featurize_labels
    from sparse_distill.pipeline import (
        distill_label_stages,
        distill_stream,
        feature_dirs,
        load_task_data,
        run_finetune_student,
    )
    from sparse_distill.run_store import stage_dir
    from sparse_distill.training import train_dan

    cfg = load_config(run_dir / "config.yaml", overrides)
    loss = loss or cfg.distill.loss
    cfg = cfg.model_copy(
        update={
            "distill": cfg.distill.model_copy(update={**seeded(seed), "gold_weight": weight, "loss": loss}),
            "finetune": cfg.finetune.model_copy(update=seeded(seed)),
        }
    )
    data = load_task_data(cfg.data)
    vocab_dir = str(stage_dir(run_dir, "vocab"))
    label_dirs = [str(stage_dir(run_dir, s)) for s in distill_label_stages(cfg)]
    # The run's own stored n-gram ids (already made: featurising only checks them), not a copy per weight and seed.
    features = [
        str(featurize_labels(d, vocab_dir, f))
        for d, f in zip(label_dirs, feature_dirs(label_dirs, stage_dir(run_dir, "distill")), strict=True)
    ]
    stream = distill_stream(cfg, data, label_dirs, features)
    if transfer_weight is not None and transfer_weight != weight:
        if weight <= 0:
            raise SystemExit("--transfer-weights needs --weights above 0 (the train rows' weight carries the mix)")
        stream.gold = transfer_weighted(stream.gold, label_dirs, weight, transfer_weight)
    dev = (data.dev.texts, data.encoded(data.dev), data.label_map)
    scored = held_out(data)
    test = (scored.texts, data.encoded(scored))
    start = time.perf_counter()
    kd = train_dan(out / "kd", vocab_dir, stream, *dev, cfg.student, cfg.distill, loss=cfg.distill.loss)
    ft = run_finetune_student(cfg, vocab_dir, kd["model_dir"], out / "kdft")
    return {
        "run": run_dir.name,
        "gold_weight": weight,
        "transfer_gold_weight": weight if transfer_weight is None else transfer_weight,
        "loss": loss,
        "seed": seed,
        "set": overrides or [],
        "kd_dev": kd["dev_accuracy"],
        "kd_test": test_accuracy(kd["model_dir"], *test),
        "kdft_dev": ft["dev_accuracy"],
        "kdft_test": test_accuracy(ft["model_dir"], *test),
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_scratch_seed(run_dir: Path, seed: int, out: Path, overrides: list[str] | None = None) -> dict:
    """The run's DAN from scratch (gold labels alone) trained again with `seed`, on the run's vocabulary: the
    baseline a student's seed spread is set beside."""
    from sparse_distill.config import load_config
    from sparse_distill.pipeline import load_task_data, run_scratch
    from sparse_distill.run_store import stage_dir

    cfg = load_config(run_dir / "config.yaml", overrides)
    cfg = cfg.model_copy(update={"scratch": cfg.scratch.model_copy(update=seeded(seed))})
    data = load_task_data(cfg.data)
    split = held_out(data)
    start = time.perf_counter()
    res = run_scratch(cfg, str(stage_dir(run_dir, "vocab")), out)
    return {
        "run": run_dir.name,
        "student": "scratch",
        "seed": seed,
        "set": overrides or [],
        "scratch_dev": res["dev_accuracy"],
        "scratch_test": test_accuracy(res["model_dir"], split.texts, data.encoded(split)),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path, help="Finished pipeline runs (runs/<name>).")
    p.add_argument(
        "--weights", nargs="*", type=float, default=[0.0, 0.5, 1.0], help="gold_weight values (none: no KD students)."
    )
    p.add_argument(
        "--transfer-weights",
        nargs="+",
        type=float,
        default=[None],
        help="The transfer texts' gold weight, each value with each --weights value (default: the same as it).",
    )
    p.add_argument(
        "--losses",
        nargs="+",
        choices=["kl", "logit_mse"],
        default=[None],
        help="distill.loss values (default: the config's).",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[13, 14, 15], help="Training seeds (KD and KD+FT).")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="A config override for every student trained here (e.g. distill.epochs=3); repeatable.",
    )
    p.add_argument(
        "--scratch",
        action="store_true",
        help="Also train the run's DAN from scratch with each seed (rows under 'scratch' in the output).",
    )
    p.add_argument("--work", type=Path, default=ROOT / "data" / "bench-distill-targets", help="Students go here.")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill_targets.json")
    args = p.parse_args()
    rows = []
    for run_dir in args.run_dirs:
        for seed in args.seeds:
            for weight, tw in [(w, t) for w in args.weights for t in args.transfer_weights]:
                for loss in args.losses:
                    name = (
                        f"w{weight:g}-s{seed}" + (f"-{loss}" if loss else "") + (f"-t{tw:g}" if tw is not None else "")
                    )
                    row = run_one(run_dir, weight, seed, args.work / run_dir.name / name, loss, args.overrides, tw)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    # The mean over seeds per run and weight: the figures the README quotes.
    summary = []
    for run_dir in args.run_dirs:
        for weight, tw in sorted({(r["gold_weight"], r["transfer_gold_weight"]) for r in rows}):
            for loss in sorted({r["loss"] for r in rows}):
                key = (run_dir.name, weight, tw, loss)
                mine = [r for r in rows if (r["run"], r["gold_weight"], r["transfer_gold_weight"], r["loss"]) == key]
                if not mine:
                    continue
                mean = {k: round(sum(r[k] for r in mine) / len(mine), 4) for k in ("kd_test", "kdft_test")}
                summary.append(
                    {
                        "run": run_dir.name,
                        "gold_weight": weight,
                        "transfer_gold_weight": tw,
                        "loss": loss,
                        "seeds": len(mine),
                        **mean,
                    }
                )
                print(
                    f"{run_dir.name:20s} weight {weight:<4g} transfer {tw:<4g} {loss:9s} KD {mean['kd_test']:.3f}  "
                    f"KD+FT {mean['kdft_test']:.3f}"
                )
    scratch = []
    if args.scratch:
        for run_dir in args.run_dirs:
            mine = []
            for seed in args.seeds:
                row = run_scratch_seed(run_dir, seed, args.work / run_dir.name / f"scratch-s{seed}", args.overrides)
                print(json.dumps(row), flush=True)
                mine.append(row)
            mean = round(sum(r["scratch_test"] for r in mine) / len(mine), 4)
            print(f"{run_dir.name:20s} scratch {mean:.3f} over {len(mine)} seeds")
            scratch += mine
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"runs": rows, "mean": summary, **({"scratch": scratch} if scratch else {})}
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
