"""Every experiment YAML shipped under jobs/ must load, so an example can never rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytune_ft.config import load_config

JOBS = Path(__file__).resolve().parents[2] / "jobs"
SHIPPED = sorted(JOBS.glob("*.yaml"))


def test_there_are_shipped_experiments():
    assert SHIPPED, f"no experiment YAMLs under {JOBS}"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_experiment_validates(path):
    cfg = load_config(path)
    assert cfg.name
    # data paths are resolved against the YAML's folder, so the example runs from any working directory
    assert Path(cfg.data.path).is_absolute()


QUICK = sorted(JOBS.glob("*-quick.yaml"))


def test_every_main_example_has_a_quick_variant():
    names = {p.stem for p in QUICK}
    assert {"sst2-minilm-quick", "sst2-minilm-full-optuna-quick", "shakespeare-zero3-quick"} <= names


@pytest.mark.parametrize("quick", QUICK, ids=[p.name for p in QUICK])
def test_quick_variant_takes_the_full_examples_path_through_the_code(quick):
    """A smoke run is worth something only if it exercises what the cluster run will: the same model, task, data
    format, fine-tuning method, DeepSpeed stage, search algorithm and scheduler; only sizes and steps shrink."""
    full = load_config(quick.with_name(quick.name.replace("-quick", "")))
    small = load_config(quick)
    same = lambda c: (  # noqa: E731
        c.model.name_or_path,
        c.model.task,
        c.data.format,
        c.data.path,
        c.finetune.method,
        c.deepspeed.zero_stage,
        c.tune.algorithm,
        c.tune.scheduler,
        c.tune.metric,
        c.tune.mode,
    )
    assert same(small) == same(full)
    assert small.data.max_rows is not None and small.data.max_rows <= 5000
    assert small.train.max_steps is not None and small.train.max_steps <= 50
    assert set(small.tune.search_space) <= set(full.tune.search_space)
