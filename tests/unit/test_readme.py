"""README.md stays true: every config key and every CLI command is documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from raytune_ft.cli import app
from raytune_ft.config.schema import ExperimentConfig, nested_models

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)
        subs = nested_models(field.annotation)
        if subs and path not in ("tune.search_space", "tasks.data"):  # a task's data is a `data` section
            keys += leaf_keys(subs[0], path + ".")
        else:
            keys.append(path)
    return keys


@pytest.mark.parametrize("key", leaf_keys(ExperimentConfig))
def test_config_key_is_documented(key):
    assert f"| `{key}` |" in README, f"README has no table row for config key {key}"


@pytest.mark.parametrize("command", [c.name or c.callback.__name__ for c in app.registered_commands])
def test_cli_command_is_documented(command):
    assert f"raytune-ft {command}" in README or f"`{command} " in README
