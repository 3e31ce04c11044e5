"""Resolve a model reference (hub id, local directory, or weights shipped in a Python package) for from_pretrained."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from raytune_ft.errors import RaytuneFtError

PACKAGE_PREFIX = "package:"


class ModelSourceError(RaytuneFtError, ValueError):
    pass


def resolve_model_source(ref: str) -> str:
    """Return what `from_pretrained` takes: a local directory path, or the hub id unchanged."""
    if ref.startswith(PACKAGE_PREFIX):
        package, _, sub = ref[len(PACKAGE_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                f"'{ref}': Python package '{package}' is not installed (pip install {package.replace('_', '-')})"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / sub
        _check_model_dir(folder, ref)
        return str(folder)
    path = Path(ref).expanduser()
    if path.is_absolute():
        _check_model_dir(path, ref)
        return str(path)
    return ref


def check_model_source(ref: str) -> None:
    resolve_model_source(ref)


def _check_model_dir(folder: Path, ref: str) -> None:
    if not folder.is_dir():
        raise ModelSourceError(f"'{ref}': model directory {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"'{ref}': {folder} has no config.json, so it is not a Hugging Face model directory")


def load_tokenizer(ref: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    source = resolve_model_source(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"could not load the tokenizer of '{ref}': {exc}") from exc
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; padding never reaches the loss, so EOS is a safe stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
