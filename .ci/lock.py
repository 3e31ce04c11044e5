"""constraints.txt: the tested set of every package `make setup` installs, pinned.

pyproject.toml keeps ranges (users install raytune_ft beside their own libraries); make run, make test and CI
install through these pins, so a release on any day cannot change what a fresh clone gets. The file records a
hash of pyproject.toml's dependencies and extras: tests/unit/test_lock.py fails when they change and the lock was
not written again.

  python .ci/lock.py write VENV_PYTHON   print the lock of what VENV_PYTHON's environment holds (`make lock`)
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
HASH_PREFIX = "# pyproject dependencies sha256: "
# Installed by `make setup` for its own reasons, not by pyproject.toml: the venv's installer itself.
NOT_LOCKED = {"pip", "setuptools", "wheel"}


def dependencies_hash(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """A hash of what pip resolves from: the dependencies and the optional extras, in a canonical form."""
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = {"dependencies": project["dependencies"], "extras": project.get("optional-dependencies", {})}
    return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()


def pins(lock: Path = LOCK) -> dict[str, str]:
    """name (normalised) -> pinned version."""
    found = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[normalise(name)] = version.strip()
    return found


def recorded_hash(lock: Path = LOCK) -> str | None:
    for line in lock.read_text().splitlines():
        if line.startswith(HASH_PREFIX):
            return line[len(HASH_PREFIX) :].strip()
    return None


def normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def write(python: str) -> str:
    frozen = subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude-editable", "--all"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    lines = []
    for line in sorted(frozen, key=str.lower):
        name, _, version = line.partition("==")
        if normalise(name) in NOT_LOCKED or not version:
            continue
        lines.append(f"{name}=={version.split('+')[0]}")  # torch 2.13.0+cpu: the CPU and CUDA builds alike
    header = [
        "# The tested set: every package `make setup` installs for raytune_ft[dev], pinned (pip constraints).",
        "# pyproject.toml keeps ranges; make run, make test and CI install through this file.",
        "# Refresh: `make lock` (a fresh venv with the newest releases pyproject.toml allows), then `make test`.",
        f"{HASH_PREFIX}{dependencies_hash()}",
    ]
    return "\n".join(header + lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "write":
        sys.exit(__doc__)
    sys.stdout.write(write(sys.argv[2]))
