"""Experiment schema: valid files, every error at once with path and line, overrides, cross-field rules."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from raytune_ft.config import ConfigError, load_config
from raytune_ft.config.checks import schema_leaf
from raytune_ft.config.loader import parse_override

MINIMAL = """\
name: demo
model:
  name_or_path: {model}
  task: sequence-classification
data:
  path: data.tsv
"""


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    return folder


def write(tmp_path: Path, text: str, model_dir: Path | None = None) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(text).replace("{model}", str(model_dir or "")))
    return path


def issues_of(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [])
    return [str(issue) for issue in info.value.issues]


def test_minimal_file_gets_defaults_and_resolved_paths(tmp_path, model_dir):
    cfg = load_config(write(tmp_path, MINIMAL, model_dir))
    assert cfg.train.lr == 5e-5
    assert cfg.deepspeed.zero_stage == 2
    assert cfg.tune is None
    assert cfg.cluster.address is None
    # input paths are relative to the config file, not the working directory
    assert cfg.data.path == str((tmp_path / "data.tsv").resolve())
    assert cfg.model.name_or_path == str(model_dir)


def test_every_error_is_reported_at_once_with_line_and_path(tmp_path, model_dir):
    path = write(
        tmp_path,
        MINIMAL
        + textwrap.dedent("""\
          max_lenght: 64
        train:
          lr: -1
          batch_size: abc
          grad_accum: 0
        deepspeed:
          zero_stage: 5
        finetune:
          method: lora
          lora: {r: 0}
        """),
        model_dir,
    )
    issues = issues_of(path)
    assert len(issues) == 6, issues
    text = "\n".join(issues)
    assert f"{path}:7: data.max_lenght: unknown key" in text
    assert "did you mean 'max_length'?" in text
    assert f"{path}:9: train.lr: must be > 0, got -1" in text
    assert f"{path}:10: train.batch_size: expected an integer, got 'abc'" in text
    assert f"{path}:11: train.grad_accum: must be > 0, got 0" in text
    assert f"{path}:13: deepspeed.zero_stage: must be one of 0, 1, 2 or 3, got 5" in text
    assert f"{path}:16: finetune.lora.r: must be > 0, got 0" in text


def test_missing_required_sections_and_bad_top_level(tmp_path):
    path = write(tmp_path, "name: 'bad name!'\nunknown_section: {}\n")
    text = "\n".join(issues_of(path))
    assert "model: required field is missing" in text
    assert "data: required field is missing" in text
    assert "name: must match" in text
    assert "unknown_section: unknown key" in text


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "deepspeed: {zero_stage: 2, offload_params: true}",
            "deepspeed.offload_params: needs zero_stage 3 (only ZeRO-3 partitions parameters), got zero_stage 2",
        ),
        (
            "deepspeed: {zero_stage: 0, offload_optimizer: true}",
            "deepspeed.offload_optimizer: needs zero_stage 1, 2 or 3",
        ),
        ("deepspeed: {precision: bf16}", "deepspeed.precision: bf16 needs scaling.use_gpu: true"),
        ("finetune: {method: partial}", "finetune.freeze: method 'partial' needs freeze.embeddings"),
        (
            "finetune: {method: lora, gradual_unfreeze: {every_steps: 10}}",
            "finetune.gradual_unfreeze: gradual unfreezing works with method full or partial",
        ),
        ("scaling: {gpus_per_worker: 1}", "scaling.gpus_per_worker: needs use_gpu: true, got 1"),
        (
            "tune: {algorithm: pbt, search_space: {train.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}}}",
            "tune.perturbation_interval: pbt needs a perturbation interval",
        ),
        (
            "tune: {algorithm: random, search_space: {train.nope: {type: uniform, low: 0, high: 1}}}",
            "tune.search_space.train.nope: 'nope' is not a key of train",
        ),
        (
            "tune: {search_space: {model.task: {type: choice, values: [causal-lm]}}}",
            "tune.search_space.model.task: only keys under",
        ),
        (
            "tune: {search_space: {train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-5}}}",
            "tune.search_space.train.lr.high: must be > low (0.001), got 1e-05",
        ),
        ("tune: {search_space: {train.lr: {type: normal}}}", "tune.search_space.train.lr: type must be one of"),
        (
            "tune: {algorithm: grid, search_space: {train.lr: {type: choice, values: [1]}}}",
            "algorithm 'grid' needs type 'grid'",
        ),
        ("tune: {algorithm: bohb}", "tune.scheduler: bohb runs with its own HyperBand scheduler"),
        (
            "serve: {autoscaling: {min_replicas: 3, max_replicas: 2}}",
            "serve.autoscaling.max_replicas: must be >= min_replicas (3), got 2",
        ),
        ("promote: {max_test_perplexity: 20}", "promote.max_test_perplexity: is a causal-lm threshold"),
        (
            "tune: {max_forgetting: 0.1, search_space: {train.lr: {type: uniform, low: 0.1, high: 0.2}}}",
            "tune.max_forgetting: needs train.retain_path",
        ),
        (
            "train: {max_steps: 10}\ntasks: [{name: main, data: {path: d.tsv}}]",
            "'main' is already a task name (the experiment's own task is multitask.primary 'main')",
        ),
        (
            "train: {max_steps: 10}\ntasks: [{name: poems, task: causal-lm, data: {path: d.txt}}]",
            "a causal-lm task needs the LM head of a causal-lm model",
        ),
        ("tasks: [{name: topic, data: {path: d.tsv}}]", "train.max_steps: a multi-task run counts steps over all"),
        ("tasks: [{name: Topic, data: {path: d.tsv}}]", "tasks"),
        ("multitask: {sampling: roundrobin}", "multitask.sampling"),
        (
            "tune: {algorithm: pbt, perturbation_interval: 4, "
            "search_space: {multitask.sampling: {type: choice, values: [uniform]}}}",
            "perturbable keys: train.lr",
        ),
        ("promote: {min_worst_slice_f1: 0.7}", "promote.min_worst_slice_f1: needs data.columns.slice"),
        ("promote: {min_test_accuracy: 1.5}", "promote.min_test_accuracy: must be <= 1, got 1.5"),
        (
            "promote: {max_p95_latency_ms: 50, latency_concurrency: 4}",
            "promote.latency_concurrency: must be one of bench.concurrency [1, 8, 32], got 4",
        ),
    ],
)
def test_contradictory_settings_are_named(tmp_path, model_dir, extra, expected):
    path = write(tmp_path, MINIMAL + extra + "\n", model_dir)
    assert any(expected in issue for issue in issues_of(path)), issues_of(path)


def test_data_section_rules(tmp_path, model_dir):
    path = write(
        tmp_path,
        MINIMAL.replace("  path: data.tsv", "  path: data.tsv\n  labels: [a]\n  split: {validation: 0.5, test: 0.5}")
        + "",
        model_dir,
    )
    text = "\n".join(issues_of(path))
    assert "data.labels: needs at least 2 classes, got 1" in text
    assert "data.split.test: validation + test must be < 1" in text


def test_causal_lm_rejects_labels_and_stratification(tmp_path, model_dir):
    path = write(
        tmp_path,
        MINIMAL.replace("sequence-classification", "causal-lm")
        + "  labels: [a, b]\n  split: {strategy: stratified}\n  curation: {balance: downsample}\n",
        model_dir,
    )
    text = "\n".join(issues_of(path))
    assert "data.labels: causal-lm has no labels" in text
    assert "data.split.strategy: stratified splitting needs labels" in text
    assert "data.curation.balance: class balancing needs labels" in text


def test_overrides_apply_and_validate_with_origin(tmp_path, model_dir):
    path = write(tmp_path, MINIMAL, model_dir)
    cfg = load_config(path, ["train.lr=3e-5", "data.max_length=64", "finetune.lora.target_modules=[query,value]"])
    assert cfg.train.lr == pytest.approx(3e-5)
    assert cfg.data.max_length == 64
    assert cfg.finetune.lora.target_modules == ["query", "value"]
    issues = issues_of(path, ["train.lr=-1", "train.nope=1", "train.lr.x=1", "noequals"])
    text = "\n".join(issues)
    assert "override 'train.lr=-1': train.lr: must be > 0, got -1" in text
    assert "override 'train.nope=1': train.nope: unknown key" in text
    assert "override 'train.lr.x=1': train.lr.x: 'train.lr' is a value, not a section" in text
    assert "override 'noequals': noequals: override 'noequals' must look like key.path=value" in text


def test_override_reaches_dotted_search_space_keys(tmp_path, model_dir):
    path = write(
        tmp_path,
        MINIMAL + "tune:\n  search_space:\n    train.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}\n",
        model_dir,
    )
    cfg = load_config(path, ["tune.search_space.train.lr.high=0.01"])
    assert cfg.tune.search_space["train.lr"].high == pytest.approx(0.01)


def test_a_grid_runs_once_unless_asked_and_a_sampled_space_four_times(tmp_path, model_dir):
    """Every trial has the experiment's seed: a second pass over an all-grid space would train copies."""
    grid = MINIMAL + "tune:\n  algorithm: grid\n  search_space:\n    train.lr: {type: grid, values: [1.0e-3, 1.0e-2]}\n"
    path = write(tmp_path, grid, model_dir)
    assert load_config(path).tune.num_samples == 1
    assert load_config(path, ["tune.num_samples=3"]).tune.num_samples == 3
    mixed = grid.replace("algorithm: grid", "algorithm: random")
    mixed += "    train.weight_decay: {type: uniform, low: 0, high: 0.1}\n"
    mixed = write(tmp_path, mixed, model_dir)
    assert load_config(mixed).tune.num_samples == 4


def test_parse_override_values_are_yaml():
    assert parse_override("a.b=3e-5") == ("a.b", 3e-5)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=") == ("a", "")


def test_scientific_notation_in_yaml_is_a_float(tmp_path, model_dir):
    cfg = load_config(write(tmp_path, MINIMAL + "deepspeed:\n  overrides: {eps: 1e-8}\n", model_dir))
    assert cfg.deepspeed.overrides["eps"] == pytest.approx(1e-8)


def test_duplicate_keys_and_invalid_yaml(tmp_path, model_dir):
    path = write(tmp_path, MINIMAL + "train:\n  lr: 1.0e-4\n  lr: 2.0e-4\n", model_dir)
    assert issues_of(path) == [f"{path}:9: train.lr: duplicate key"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    assert "invalid YAML" in issues_of(bad)[0]


def test_environment_variables_expand_with_defaults(tmp_path, model_dir, monkeypatch):
    text = MINIMAL.replace("path: data.tsv", "path: ${DATA_DIR:-inputs}/data.tsv") + "serve:\n  host: ${HOST_X}\n"
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.delenv("HOST_X", raising=False)
    assert any(
        "serve.host: environment variable HOST_X is not set" in i for i in issues_of(write(tmp_path, text, model_dir))
    )
    monkeypatch.setenv("HOST_X", "0.0.0.0")
    assert load_config(tmp_path / "exp.yaml").data.path == str(tmp_path / "inputs" / "data.tsv")
    monkeypatch.setenv("DATA_DIR", "/srv/data")
    assert load_config(tmp_path / "exp.yaml").data.path == "/srv/data/data.tsv"


def test_model_reference_is_checked(tmp_path):
    path = write(tmp_path, MINIMAL.replace("{model}", "package:no_such_package_xyz/model"))
    assert any(
        "model.name_or_path: 'package:no_such_package_xyz/model': Python package 'no_such_package_xyz' is "
        "not installed" in i
        for i in issues_of(path)
    )
    path = write(tmp_path, MINIMAL.replace("{model}", "./missing-dir"))
    assert any("model.name_or_path" in i and "does not exist" in i for i in issues_of(path))
    # a hub id cannot be checked offline and is kept as written
    assert load_config(write(tmp_path, MINIMAL.replace("{model}", "org/some-model"))).model.name_or_path == (
        "org/some-model"
    )


def test_missing_and_non_mapping_files(tmp_path):
    assert "file not found" in issues_of(tmp_path / "nope.yaml")[0]
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert "must be a mapping of sections" in issues_of(path)[0]
    path.write_bytes(b"name: \xff\n")
    assert "not UTF-8" in issues_of(path)[0]


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("train.lr", None),
        ("finetune.lora.r", None),
        ("ewc", "'ewc' is not a key of top level"),
        ("finetune.ewc.lambda", None),
        ("train", "'train' is a section"),
        ("train.lr.x", "'train.lr' is a value"),
    ],
)
def test_schema_leaf(path, problem):
    result = schema_leaf(path)
    assert (result is None) if problem is None else (problem in result)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("  split: {validation: 0.95}", "data.split.test: validation + test must be < 1"),
        ("serve: {autoscaling: {min_replicas: 3}}", "serve.autoscaling.max_replicas: must be >= min_replicas (3)"),
    ],
)
def test_rules_also_check_default_values(tmp_path, model_dir, extra, expected):
    path = write(tmp_path, MINIMAL + extra + "\n", model_dir)
    assert any(expected in issue for issue in issues_of(path)), issues_of(path)


def test_section_rules_fire_beside_unrelated_errors(tmp_path, model_dir):
    path = write(tmp_path, MINIMAL + "deepspeed: {zero_stage: 1, offload_params: true}\ntrain: {lr: 0}\n", model_dir)
    text = "\n".join(issues_of(path))
    assert "deepspeed.offload_params: needs zero_stage 3" in text
    assert "train.lr: must be > 0, got 0" in text


def test_errors_inside_a_list_of_tasks_name_their_line(tmp_path, model_dir):
    extra = (
        "train: {max_steps: 10}\ntasks:\n"
        "  - name: topic\n    data: {path: t.tsv}\n"
        "  - name: topic\n    data: {path: u.tsv}\n"
    )
    path = write(tmp_path, MINIMAL + extra, model_dir)
    line = (MINIMAL + extra).splitlines().index("  - name: topic", 9) + 1
    found = issues_of(path)
    assert any(f"exp.yaml:{line}: tasks[1].name: 'topic' is already a task name" in i for i in found), found
