"""docs/config.md and docs/cli.md stay what raytune_ft/reference.py renders from the schema and the command line's
own help, and every config key and command-line option has a description for them to render."""

from __future__ import annotations

import pytest
from pydantic import BaseModel
from test_imports import package_graph

from raytune_ft import reference
from raytune_ft.config.schema import ExperimentConfig, nested_models

REWRITE = f"run `.venv/bin/{reference.REWRITE}` to write it again"


@pytest.mark.parametrize("page", sorted(reference.PAGES))
def test_reference_page_is_what_the_code_renders(page):
    path = reference.DOCS / page
    assert path.is_file(), f"docs/{page} is missing: {REWRITE}"
    assert path.read_text() == reference.PAGES[page](), f"docs/{page} is stale: {REWRITE}"


def reachable_models(model: type[BaseModel] = ExperimentConfig) -> set[type[BaseModel]]:
    found = {model}
    for field in model.model_fields.values():
        for sub in nested_models(field.annotation):
            if sub not in found:
                found |= reachable_models(sub)
    return found


def test_every_section_of_the_schema_is_in_the_reference():
    """Checked against a walk of its own, so that the renderer cannot skip a model unnoticed."""
    documented = {section.model for section in reference.config_sections()}
    assert reachable_models() == documented


@pytest.mark.parametrize("section", reference.config_sections(), ids=lambda s: s.anchor)
def test_every_config_key_and_section_is_described(section):
    assert section.model.__doc__, f"{section.model.__name__} ({section.path or 'top level'}) has no docstring"
    missing = [key for key, field in section.leaves if not (field.description or "").strip()]
    assert not missing, f"no Field(description=...) in raytune_ft/config/schema.py for {missing}"


COMMANDS = {words: (command, ctx) for words, command, ctx in reference.command_tree()}


@pytest.mark.parametrize("words", sorted(COMMANDS), ids=lambda w: " ".join(("raytune-ft", *w)))
def test_every_command_and_option_has_help(words):
    command, ctx = COMMANDS[words]
    assert (command.help or "").strip(), f"`raytune-ft {' '.join(words)}` has no help text (its docstring)"
    missing = [p.name for p in reference.options(command, ctx) if not (p.help or "").strip()]
    assert not missing, f"`raytune-ft {' '.join(words)}`: no help= for {missing}"


def test_nothing_in_the_package_imports_the_reference():
    """It loads the whole command line to read its help: a run must never pay for that."""
    importers = [name for name, imports in package_graph().items() if "raytune_ft.reference" in imports]
    assert not importers
