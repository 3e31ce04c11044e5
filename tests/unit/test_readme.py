"""README.md stays true: every config key and every CLI command is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel
from test_cli import command_tree

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


COMMAND_ROWS = [re.split(r"(?<!\\)\|", line)[1] for line in README.splitlines() if line.startswith("| `raytune-ft ")]


@pytest.mark.parametrize("words, command", command_tree(), ids=[" ".join(w) for w, _ in command_tree()])
def test_cli_command_and_its_options_are_documented(words, command):
    """The command-line table has a row for every command a user can type, group subcommands included, and that
    row names each of its options."""
    name = "raytune-ft " + " ".join(words)
    rows = [cell for cell in COMMAND_ROWS if cell.strip().startswith((f"`{name} ", f"`{name}`"))]
    assert rows, f"README's command table has no row for `{name}`"
    if hasattr(command, "commands"):
        return  # a group: its subcommands have rows of their own
    options = [o for param in command.params for o in param.opts if o.startswith("--") and o != "--help"]
    missing = [o for o in options if not any(o in cell for cell in rows)]
    assert not missing, f"README's row for `{name}` does not name {missing}"
