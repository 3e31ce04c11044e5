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
