"""Library pieces of the experiments that need no base run: tables, curve thinning, the WOS reading, the registry."""

from __future__ import annotations

import pytest

from sparse_distill.config import ConfigError
from sparse_distill.experiments import EXPERIMENTS, experiment_names, get_experiment
from sparse_distill.experiments.cascade import _spread
from sparse_distill.experiments.tables import markdown_table
from sparse_distill.experiments.wos import predict_from_wos


def test_markdown_table_escapes_pipes_and_formats_numbers():
    rows = [
        {
            "ablation": "grid",
            "model": "|V| = 5,000, d = 200",
            "accuracy": 0.81234,
            "params": 1051970,
            "docs_per_s": 97.36,
        },
        {"ablation": "grid", "model": "x", "accuracy": 0.5, "params": 10, "docs_per_s": 44436.2, "note": "n"},
    ]
    table = markdown_table("ablations", rows, "sst2", "test", {})
    lines = table.splitlines()
    assert lines[0] == "**ablations** on sst2 (test split)"
    header = lines[2]
    assert header == "| ablation | model | test acc | params | docs/s (1 thread) | note |"
    assert "| grid | \\|V\\| = 5,000, d = 200 | 0.8123 | 1,051,970 | 97.4 | - |" in lines
    assert "| grid | x | 0.5000 | 10 | 44,436 | n |" in lines
    # Every row has as many cells as the header.
    assert all(line.replace("\\|", "").count("|") == header.count("|") for line in lines[2:])


def test_cascade_table_states_the_choice_or_its_absence():
    rows = [
        {
            "threshold": 0.0,
            "deferred": 0.0,
            "accuracy": 0.8,
            "docs_per_s": 1000.0,
            "speedup_vs_teacher": 100.0,
            "chosen": False,
        }
    ]
    info = {"target_accuracy": 0.95, "threshold": None, "metric": "max_prob"}
    assert "No threshold reaches the target accuracy 0.9500" in markdown_table("cascade", rows, "t", "test", info)
    info = {**info, "threshold": 0.9, "student_s_per_doc": 1e-4, "teacher_s_per_doc": 0.01}
    text = markdown_table("cascade", rows, "t", "test", info)
    assert "threshold 0.9000 on max_prob; student 10,000 docs/s, teacher 100.0 docs/s" in text


def test_spread_keeps_both_ends_and_thins_evenly():
    curve = [{"deferred": i / 100} for i in range(101)]
    picked = _spread(curve, 5)
    assert [p["deferred"] for p in picked] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert _spread(curve[:3], 5) == curve[:3]


def test_wos_prediction_bands():
    assert predict_from_wos(0.1).startswith("low")
    assert predict_from_wos(0.45).startswith("moderate")
    assert predict_from_wos(0.9).startswith("high")


def test_one_registry_names_the_experiments():
    assert experiment_names("all") == list(EXPERIMENTS) and len(EXPERIMENTS) == 8
    assert experiment_names(" wos, cascade ") == ["wos", "cascade"]
    assert get_experiment("cascade").with_info and get_experiment("wos").split == "dev"
    with pytest.raises(ConfigError, match=r"unknown \['pruning'\]"):
        experiment_names("privacy,pruning")
    with pytest.raises(ConfigError, match="give one"):
        get_experiment("wos,mlp")
