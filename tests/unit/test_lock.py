"""constraints.txt (the tested set `make setup` installs) matches pyproject.toml, and the environment the tests
run in is the one it pins. After a change to the dependencies: `make lock`."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("ci_lock", ROOT / ".ci" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)


def requirements() -> list[Requirement]:
    """Every requirement of the package and its extras (the self-references raytune_ft[...] aside)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return [Requirement(r) for r in listed if not r.startswith("raytune_ft")]


def test_the_lock_was_written_for_these_dependencies():
    assert lock.recorded_hash() == lock.dependencies_hash(), (
        "pyproject.toml's dependencies changed since constraints.txt was written: run `make lock`"
    )


def test_every_requirement_is_pinned_inside_its_range():
    pins = lock.pins()
    for requirement in requirements():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = lock.normalise(requirement.name)
        assert name in pins, f"{requirement} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} not in {requirement}"
        )


def test_this_environment_is_the_locked_one():
    wrong = {}
    for name, pinned in lock.pins().items():
        installed = importlib.metadata.version(name)
        if Version(installed).base_version != Version(pinned).base_version:
            wrong[name] = (installed, pinned)
    assert not wrong, f"installed vs pinned (run `make setup`): {wrong}"
