"""benchmarks/ship_rule.py: the KD / KD+FT pairs of stored results, found once each, and the two shipping rules."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ship_rule.py"


def _script():
    spec = importlib.util.spec_from_file_location("ship_rule", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pair(run: str, seed: int, kd: tuple[float, float], kdft: tuple[float, float]) -> dict:
    return {"run": run, "seed": seed, "kd_dev": kd[0], "kd_test": kd[1], "kdft_dev": kdft[0], "kdft_test": kdft[1]}


def test_pairs_are_found_nested_once_each_and_scored_by_both_rules(tmp_path: Path) -> None:
    ship = _script()
    lower = _pair("a", 13, (0.80, 0.70), (0.79, 0.74))  # KD+FT lower on dev, better on test
    higher = _pair("a", 14, (0.80, 0.70), (0.82, 0.68))  # KD+FT higher on dev, worse on test
    (tmp_path / "one.json").write_text(json.dumps({"runs": [lower, higher], "about": "text"}))
    # The same pair again in another file (a summary of the first) and a row without dev figures: neither counts.
    (tmp_path / "two.json").write_text(json.dumps([{"mean": lower}, {"run": "b", "kd_test": 0.5, "kdft_test": 0.6}]))
    (tmp_path / "ship_rule.json").write_text(json.dumps({"rows": [_pair("c", 1, (0.1, 0.1), (0.1, 0.9))]}))

    rows = ship.collect(tmp_path)
    assert len(rows) == 2 and {r["source"] for r in rows} == {"one.json"}
    summary = ship.compare(rows)
    # dev picks KD (0.70) for the first and KD+FT (0.68) for the second; KD+FT throughout gives 0.74 and 0.68.
    assert summary["mean_test"]["dev"] == pytest.approx(0.69)
    assert summary["mean_test"]["kdft"] == pytest.approx(0.71)
    assert summary["by_dev_gap"]["KD+FT lower on dev"] == {"KD+FT better on test": 1}
    assert summary["by_dev_gap"]["KD+FT higher by >= 1"] == {"KD better on test": 1}
    low = summary["kdft_lower_on_dev"]
    assert low["rows"] == 1 and low["mean_test_gap"] == pytest.approx(0.04) and low["runs"] == ["a"]
