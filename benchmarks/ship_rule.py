"""Which student to ship, KD or KD+FT: every stored exploration row that trained both on the same labels (the
`kd_dev`, `kd_test`, `kdft_dev`, `kdft_test` quads of `benchmarks/results/*.json`, written by `distill_targets.py`
and its kin through the pipeline's own KD and KD+FT code), scored under two rules:

- `dev`: the better of the two on dev, KD+FT on a tie (`publishing.best_student` until session 60);
- `kdft`: KD+FT whenever there is one. Its stage already keeps each member's KD weights unless fine-tuning beats them
  on dev, so the merged students differ by what the members gained.

It prints, by how far KD+FT is from KD on dev, how often KD+FT is the better one on test, and each rule's mean test
accuracy, and writes them to `benchmarks/results/ship_rule.json`. It trains nothing.

    python benchmarks/ship_rule.py
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("kd_dev", "kd_test", "kdft_dev", "kdft_test")
# Dev gaps (KD+FT minus KD, in accuracy) that name the bins of the table.
BINS = (
    (-1.0, -1e-9, "KD+FT lower on dev"),
    (-1e-9, 1e-9, "equal on dev"),
    (1e-9, 0.005, "KD+FT higher by < 0.5"),
    (0.005, 0.01, "KD+FT higher by 0.5-1"),
    (0.01, 1.0, "KD+FT higher by >= 1"),
)


def collect(results: Path = RESULTS) -> list[dict[str, Any]]:
    """Every KD / KD+FT quad in the stored results, once each (files repeat rows of one another)."""
    rows: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()

    def walk(node: Any, source: str) -> None:
        if isinstance(node, dict):
            if all(isinstance(node.get(k), float) for k in KEYS):
                key = tuple(round(node[k], 6) for k in KEYS) + (node.get("run"), node.get("seed"))
                if key not in seen:
                    seen.add(key)
                    pair = {k: node[k] for k in KEYS}
                    rows.append({"source": source, "run": node.get("run"), "seed": node.get("seed"), **pair})
            for value in node.values():
                walk(value, source)
        elif isinstance(node, list):
            for value in node:
                walk(value, source)

    for path in sorted(results.glob("*.json")):
        if path.name != "ship_rule.json":
            walk(json.loads(path.read_text()), path.name)
    return rows


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The two rules' mean test accuracy, and KD+FT against KD on test by their gap on dev."""
    by_gap: dict[str, Counter] = {}
    for lo, hi, name in BINS:
        counts: Counter = Counter()
        for r in rows:
            if lo <= r["kdft_dev"] - r["kd_dev"] < hi:
                gap = r["kdft_test"] - r["kd_test"]
                counts["KD+FT better on test" if gap > 1e-9 else "KD better on test" if gap < -1e-9 else "equal"] += 1
        by_gap[name] = dict(counts)
    lower = [r for r in rows if r["kdft_dev"] < r["kd_dev"] - 1e-9]
    dev_rule = [r["kdft_test"] if r["kdft_dev"] >= r["kd_dev"] else r["kd_test"] for r in rows]
    return {
        "rows": len(rows),
        "sources": dict(Counter(r["source"] for r in rows)),
        "mean_test": {
            "dev": sum(dev_rule) / len(rows),
            "kdft": sum(r["kdft_test"] for r in rows) / len(rows),
            "kd": sum(r["kd_test"] for r in rows) / len(rows),
        },
        "by_dev_gap": by_gap,
        "kdft_lower_on_dev": {
            "rows": len(lower),
            "mean_dev_gap": sum(r["kdft_dev"] - r["kd_dev"] for r in lower) / max(len(lower), 1),
            "mean_test_gap": sum(r["kdft_test"] - r["kd_test"] for r in lower) / max(len(lower), 1),
            "largest_dev_gap": min((r["kdft_dev"] - r["kd_dev"] for r in lower), default=0.0),
            "runs": sorted({str(r["run"]) for r in lower}),
        },
    }


def main() -> None:
    summary = compare(collect())
    print(f"{summary['rows']} KD / KD+FT pairs from {len(summary['sources'])} result files")
    for rule, acc in summary["mean_test"].items():
        print(f"  ship {rule:<5} mean test accuracy {acc:.5f}")
    for name, counts in summary["by_dev_gap"].items():
        print(f"  {name:<24} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    low = summary["kdft_lower_on_dev"]
    print(
        f"  where KD+FT is lower on dev ({low['rows']} pairs, mean {100 * low['mean_dev_gap']:+.2f} points, at most "
        f"{100 * low['largest_dev_gap']:+.2f}): KD+FT {100 * low['mean_test_gap']:+.2f} points on test on average"
    )
    (RESULTS / "ship_rule.json").write_text(
        json.dumps({"command": "python benchmarks/ship_rule.py"} | summary, indent=1)
    )


if __name__ == "__main__":
    main()
