"""Checkpoint layout, manifests and verification.

Every worker writes its own files into a local temporary directory and, last, `manifest.rank<R>.json` with the
SHA-256 of each of them; Ray Train merges the workers' directories into `RUN/train/step_NNNNNN/`. Rank 0 adds
`state.json` (step, epoch, position in the epoch, metrics, config hash, world size). A checkpoint counts as whole
only when every rank's manifest is there and every listed file matches its checksum, so a write cut short is
never loaded, and resume falls back to the newest checkpoint that is whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from raytune_ft.data.store import file_sha256

STATE = "state.json"
TRAINABLE = "trainable.safetensors"
DS_TAG = "ds"
CHECKPOINT_PREFIX = "step_"


class CheckpointError(RuntimeError):
    pass


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def config_hash(experiment: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(experiment, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(directory: Path, rank: int) -> None:
    """List every file this rank wrote, with checksums; written last, atomically."""
    files = {
        str(p.relative_to(directory)): file_sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.startswith("manifest.")
    }
    tmp = directory / f".manifest.rank{rank}.tmp"
    tmp.write_text(json.dumps({"rank": rank, "files": files}, indent=1))
    os.replace(tmp, directory / f"manifest.rank{rank}.json")


def read_state(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / STATE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory}: no readable {STATE} ({exc})") from None


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Return the checkpoint's state if it is whole; raise CheckpointError naming the first bad file."""
    directory = Path(directory)
    state = read_state(directory)
    world = int(state.get("world_size", 0))
    if world < 1:
        raise CheckpointError(f"{directory / STATE}: world_size missing")
    for rank in range(world):
        manifest_path = directory / f"manifest.rank{rank}.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise CheckpointError(
                f"{manifest_path}: missing or unreadable; the checkpoint write did not finish"
            ) from None
        for name, digest in manifest["files"].items():
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {manifest_path.name} but missing")
            if file_sha256(path) != digest:
                raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted); refusing to load it")
    return state


def list_checkpoints(train_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first."""
    if not train_dir.is_dir():
        return []
    return sorted(p for p in train_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def newest_whole_checkpoint(candidates: list[Path], log: Any = print) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, saying which newer ones were skipped and why."""
    for directory in sorted(candidates, reverse=True):
        try:
            return directory, verify_checkpoint(directory)
        except CheckpointError as exc:
            log(f"skipping checkpoint {directory.name}: {exc}")
    return None
