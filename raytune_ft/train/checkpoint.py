"""Checkpoint layout, manifests and verification.

Every worker writes its own files into a local temporary directory and, last, `manifest.rank<R>.json` with the
SHA-256 of each of them; Ray Train merges the workers' directories into `RUN/train/step_NNNNNN/`. Rank 0 adds
`state.json` (step, epoch, position in the epoch, metrics, config hash, world size, and which model wrote it). A
checkpoint counts as whole only when every rank's manifest is there and every listed file matches its checksum, so
a write cut short is never loaded, and resume falls back to the newest checkpoint that is whole. A whole checkpoint
of another model is refused by name (`check_same_model`) instead of failing deep inside DeepSpeed's loader.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raytune_ft.data.store import file_sha256
from raytune_ft.errors import RaytuneFtError

STATE = "state.json"
TRAINABLE = "trainable.safetensors"
DS_TAG = "ds"
PROBE_GENERATIONS = "probe_generations.json"  # chat: greedy answers to the first validation prompts
CHECKPOINT_PREFIX = "step_"


class CheckpointError(RaytuneFtError, RuntimeError):
    pass


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_step(directory: Path) -> int:
    """The step a checkpoint directory was written at, from its name (checkpoint_name's inverse)."""
    return int(directory.name.removeprefix(CHECKPOINT_PREFIX))


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


def _read_json(path: Path, unreadable: str = "", garbled: str = "") -> Any:
    """PATH's JSON; CheckpointError (one line, naming the file) when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint write did not finish") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}){unreadable}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}){garbled}"
        ) from None


def read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE
    state = _read_json(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(state).__name__}")
    return state


def _read_manifest(path: Path) -> dict[str, str]:
    """The {file: sha256} of one rank's manifest; CheckpointError (one line) when it is missing or garbled."""
    manifest = _read_json(
        path,
        unreadable="; the checkpoint write did not finish",
        garbled="; the checkpoint write did not finish or the file was damaged",
    )
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CheckpointError(f"{path}: not a checkpoint manifest (no 'files' mapping of file name to SHA-256)")
    for name in files:
        # a manifest names files inside its checkpoint; anything else was not written by a worker
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{path}: lists '{name}', which is outside the checkpoint directory")
    return files


def verify_checkpoint(directory: str | Path, expected_model: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the checkpoint's state if it is whole; raise CheckpointError naming the first bad file. With
    `expected_model` (a `model_record`), a checkpoint written by another model is refused as well."""
    directory = Path(directory)
    state = read_state(directory)
    try:
        world = int(state.get("world_size", 0))
    except (TypeError, ValueError):
        world = 0
    if world < 1:
        raise CheckpointError(f"{directory / STATE}: world_size missing")
    for rank in range(world):
        manifest_path = directory / f"manifest.rank{rank}.json"
        for name, digest in _read_manifest(manifest_path).items():
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {manifest_path.name} but missing")
            if file_sha256(path) != digest:
                raise CheckpointError(
                    f"{path}: checksum mismatch with {manifest_path.name} ({path.stat().st_size} bytes; truncated or "
                    "corrupted); refusing to load it"
                )
    if expected_model is not None:
        check_same_model(directory, state, expected_model)
    return state


# What identifies the model a checkpoint belongs to: the reference it was built from and its shape.
MODEL_FIELDS = ("name_or_path", "architecture", "num_parameters", "trainable_names_sha")


def model_record(model: Any, name_or_path: str) -> dict[str, Any]:
    """Which model a checkpoint holds: what it was built from, its class, its size and which weights train.

    Counts ZeRO-3 partitioned parameters by their full size (`ds_numel`), so every rank and stage agrees."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's own model
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    return {
        "name_or_path": name_or_path,
        "architecture": type(base).__name__,
        "model_type": getattr(getattr(base, "config", None), "model_type", None),
        "num_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
        "num_trainable_tensors": len(trainable),
        "trainable_names_sha": hashlib.sha256("\n".join(trainable).encode()).hexdigest(),
    }


def _describe_model(record: dict[str, Any]) -> str:
    size = record.get("num_parameters")
    parts = [str(record.get("architecture", "?"))]
    if isinstance(size, int):
        parts.append(f"{size:,} parameters")
    if record.get("num_trainable_tensors") is not None:
        parts.append(f"{record['num_trainable_tensors']} trainable tensors")
    return f"'{record.get('name_or_path', '?')}' ({', '.join(parts)})"


def check_same_model(directory: str | Path, state: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise CheckpointError naming both models when the checkpoint's state records another model than
    `expected`. Checkpoints written before the record existed carry none and pass."""
    saved = state.get("model")
    if not isinstance(saved, dict):
        return
    differ = [key for key in MODEL_FIELDS if key in saved and key in expected and saved[key] != expected[key]]
    if differ:
        what = ", ".join("trainable parameter names" if key == "trainable_names_sha" else key for key in differ)
        raise CheckpointError(
            f"{directory}: checkpoint of another model: it holds {_describe_model(saved)}, this run builds "
            f"{_describe_model(expected)} (they differ in {what}); refusing to load it. Resume with the model and "
            "finetune settings it was written with, or start a new run"
        )


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


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside: every `torch.load` reads with `weights_only=True`.

    DeepSpeed's checkpoint engine calls `torch.load(..., weights_only=False)`, so a pickle planted in a checkpoint
    file would run code on every worker that resumes from it. Its optimizer files hold a few DeepSpeed state
    classes (loss scaler, ZeRO stage, fragment addresses); classes defined in `deepspeed` are allowed, nothing
    else: any other global is refused with a CheckpointError that names it and the file."""
    import pickle

    import torch

    original = torch.load

    def load(source: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        allowed: list[type] = []
        while True:
            with torch.serialization.safe_globals(allowed):
                try:
                    return original(source, *args, **kwargs)
                except pickle.UnpicklingError as exc:
                    name = _refused_global(str(exc))
                    cls = _deepspeed_class(name) if name else None
                    if cls is None or cls in allowed:
                        raise CheckpointError(
                            f"{source}: refused to unpickle {name or 'an object'} (only tensors, plain data and "
                            "DeepSpeed's own state classes are read from a checkpoint)"
                        ) from None
                    allowed.append(cls)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _refused_global(message: str) -> str | None:
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


def _deepspeed_class(name: str) -> type | None:
    module_name, _, attr = name.rpartition(".")
    if not module_name.startswith("deepspeed."):
        return None
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None
    return found if isinstance(found, type) and found.__module__.startswith("deepspeed.") else None
