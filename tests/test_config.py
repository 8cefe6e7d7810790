"""Typed configs: unknown keys and bad values name their key path, overrides are YAML, bad files name the file, and
fingerprints are stable."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparse_distill.config import (
    ConfigError,
    ExperimentConfig,
    LabelJob,
    PipelineConfig,
    apply_overrides,
    fingerprint,
    load_config,
    load_experiment_config,
)

MINIMAL = "name: t\ndata: {train: train.parquet, dev: dev.parquet}\nteacher: {model: teacher}\n"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL)
    return path


def test_a_minimal_file_loads_with_the_defaults(config_file):
    cfg = load_config(config_file)
    assert isinstance(cfg, PipelineConfig)
    assert (cfg.name, cfg.data.train, cfg.teacher.model) == ("t", "train.parquet", "teacher")
    assert cfg.label == PipelineConfig.model_fields["label"].default_factory()


@pytest.mark.parametrize(
    ("extra", "key_path"),
    [
        ("bogus: 1\n", "bogus"),
        ("student: {dimm: 8}\n", "student.dimm"),
        ("distill: {lr: 0.1, temprature: 2}\n", "distill.temprature"),
        ("tracking: {experiment: x, nope: {deep: 1}}\n", "tracking.nope"),
    ],
)
def test_unknown_keys_are_errors_naming_the_key_path_and_the_file(config_file, extra, key_path):
    config_file.write_text(MINIMAL + extra)
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    assert str(e.value).startswith(f"{config_file}: ")
    assert f"{key_path}: " in str(e.value)


def test_mistyped_and_out_of_range_values_name_their_key_path(config_file):
    with pytest.raises(ConfigError, match=r"student\.dim: "):
        load_config(config_file, ["student.dim=0"])
    with pytest.raises(ConfigError, match=r"label\.precision: "):
        load_config(config_file, ["label.precision=fp8"])
    with pytest.raises(ConfigError, match=r"distill\.batch_size: "):
        load_config(config_file, ["distill.batch_size=many"])


def test_overrides_are_parsed_as_yaml(config_file):
    cfg = load_config(
        config_file,
        [
            "distill.lr=1e-2",
            "student.pooling=max",
            "data.corpus=[a.parquet, b.parquet]",
            "label.quantize_int8=true",
            "data.max_train_samples=null",
            "name='0123'",  # quoted: a string, not YAML's octal number
        ],
    )
    assert cfg.distill.lr == pytest.approx(0.01) and isinstance(cfg.distill.lr, float)
    assert cfg.student.pooling == "max"
    assert cfg.data.corpus == ["a.parquet", "b.parquet"]
    assert cfg.label.quantize_int8 is True
    assert cfg.data.max_train_samples is None
    assert cfg.name == "0123"
    with pytest.raises(ConfigError, match="name: "):  # unquoted, YAML reads an int: a mistyped value
        load_config(config_file, ["name=0123"])


def test_overrides_create_sections_and_refuse_paths_through_values():
    raw = apply_overrides({"a": {"b": 1}}, ["a.c=x: 1", "d.e.f=2", "a.b=3", "g="])
    assert raw == {"a": {"b": 3, "c": {"x": 1}}, "d": {"e": {"f": 2}}, "g": ""}
    with pytest.raises(ConfigError, match="'b' is not a section"):
        apply_overrides({"a": {"b": 1}}, ["a.b.c=2"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["no-equals-sign"])
    with pytest.raises(ConfigError, match="empty key"):
        apply_overrides({}, ["=1"])


def test_an_override_of_an_unknown_key_is_an_error(config_file):
    with pytest.raises(ConfigError, match=r"student\.width: "):
        load_config(config_file, ["student.width=3"])


@pytest.mark.parametrize("content", ["- a\n- b\n", "just a string\n", "42\n"])
def test_a_file_whose_top_level_is_not_a_mapping_is_named(tmp_path, content):
    path = tmp_path / "list.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"^{path}: the top level must be a mapping"):
        load_config(path)


def test_invalid_yaml_and_a_missing_file_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: [unclosed\n")
    with pytest.raises(ConfigError, match=f"^{bad}: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(tmp_path / "nowhere.yaml")


def test_a_binary_file_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


def test_an_empty_file_is_missing_its_required_sections(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "data: " in str(e.value) and "teacher: " in str(e.value)


def test_experiment_configs_are_strict_too(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("pipeline: c.yaml\nprivacy: {vocab_from_corpus: true}\n")
    cfg = load_experiment_config(path, ["train.lr=0.5"])
    assert isinstance(cfg, ExperimentConfig) and cfg.privacy.vocab_from_corpus and cfg.train.lr == 0.5
    with pytest.raises(ConfigError, match=r"privacy\.vocab_from_corpu: "):
        load_experiment_config(path, ["privacy.vocab_from_corpu=false"])
    path.write_text("privacy: {}\n")
    with pytest.raises(ConfigError, match="pipeline: "):  # the base pipeline is required
        load_experiment_config(path)


def test_assignment_is_validated_as_well():
    job = LabelJob(teacher="t", corpus=["c"], out="o")
    with pytest.raises(ValueError):
        job.label.shard_size = 0


def test_fingerprint_is_stable_and_sensitive(config_file):
    cfg = load_config(config_file)
    same = load_config(config_file)
    assert fingerprint("stage", cfg.student) == fingerprint("stage", same.student)
    assert len(fingerprint("x")) == 16 and int(fingerprint("x"), 16) >= 0
    # key order in dicts does not matter; values, order of parts and the stage name do
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint("a", "b") != fingerprint("b", "a")
    assert fingerprint("distill", cfg.student) != fingerprint("scratch", cfg.student)
    changed = load_config(config_file, ["student.dim=7"])
    assert fingerprint(changed.student) != fingerprint(cfg.student)
    # a model and its JSON dump give the same key: callers may pass either
    assert fingerprint(cfg.student) == fingerprint(cfg.student.model_dump(mode="json"))


def test_fingerprint_includes_the_library_version(monkeypatch):
    import sparse_distill.config as config

    before = fingerprint("x")
    monkeypatch.setattr(config, "__version__", "0.0.0-other")
    assert fingerprint("x") != before


def test_fingerprint_is_fixed_across_processes():
    # A cache key must not depend on hash randomisation or the process: compare with a fresh interpreter.
    import subprocess
    import sys

    code = "from sparse_distill.config import fingerprint; print(fingerprint('x', {'b': [1, 2.5], 'a': None}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == fingerprint("x", {"b": [1, 2.5], "a": None})


def test_a_runner_fans_out_unless_it_is_one_thread() -> None:
    from sparse_distill.config import LabelConfig, VocabConfig

    assert not LabelConfig().fans_out
    assert LabelConfig(workers=2).fans_out
    assert VocabConfig(runner="process").fans_out
    assert VocabConfig(runner="dask", workers=1).fans_out


def test_subword_lengths_must_be_ordered(config_file):
    config_file.write_text(MINIMAL + "vocab:\n  subword_min: 5\n  subword_max: 4\n")
    with pytest.raises(ConfigError, match="subword_min"):
        load_config(config_file)
