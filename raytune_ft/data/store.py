"""On-disk layout of prepared data: split files, report and manifest, written atomically.

A data directory is built in a temporary sibling and renamed into place, manifest written last, so a crash
never leaves a half-written directory that looks complete. The test split is written once: it is never
overwritten in place, and every read of it is logged.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
REPORT = "data_report.json"
TEST_READS = "test_reads.jsonl"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(data_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((data_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(data_dir: Path, fingerprint: str) -> bool:
    """True when the directory holds a finished build of this fingerprint with every file intact."""
    manifest = read_manifest(data_dir)
    if not manifest or manifest.get("fingerprint") != fingerprint or not (data_dir / REPORT).is_file():
        return False
    return all(
        (data_dir / name).is_file() and file_sha256(data_dir / name) == digest
        for name, digest in manifest.get("files", {}).items()
    )


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_prepared(data_dir: Path, tables: dict[str, Any], report: dict[str, Any], fingerprint: str) -> None:
    """Write split tables and the report into a fresh `data_dir`, replacing nothing that holds a test split."""
    import pyarrow.parquet as pq

    if (data_dir / "test.parquet").exists():
        raise FileExistsError(f"{data_dir} already holds a test split; it is written once")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_dir.with_name(f".{data_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for name, table in tables.items():
        pq.write_table(table, tmp / f"{name}.parquet")
        files[f"{name}.parquet"] = file_sha256(tmp / f"{name}.parquet")
    write_json_atomic(tmp / REPORT, report)
    write_json_atomic(tmp / MANIFEST, {"fingerprint": fingerprint, "files": files, "created": _now()})
    (tmp / "test.parquet").chmod(0o444)
    if data_dir.exists():
        shutil.rmtree(data_dir)  # an incomplete build without a test split: nothing of value in it
    os.replace(tmp, data_dir)


def retire(data_dir: Path) -> Path:
    """Move an existing data directory aside (never delete it): its test split may already have been used."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = data_dir.with_name(f"{data_dir.name}.replaced-{stamp}"), 1
    while target.exists():
        n += 1
        target = data_dir.with_name(f"{data_dir.name}.replaced-{stamp}-{n}")
    os.replace(data_dir, target)
    return target


def load_split(data_dir: str | Path, name: str) -> Any:
    """Training and validation splits as Arrow tables."""
    import pyarrow.parquet as pq

    if name == "test":
        raise ValueError("the test split is read once, by the final evaluation: use load_test_split")
    return pq.read_table(Path(data_dir) / f"{name}.parquet")


def load_test_split(data_dir: str | Path, reader: str) -> Any:
    """The test split, for the final evaluation only; each read is appended to test_reads.jsonl."""
    import pyarrow.parquet as pq

    data_dir = Path(data_dir)
    table = pq.read_table(data_dir / "test.parquet")
    entry = {"time": _now(), "reader": reader, "user": getpass.getuser(), "host": socket.gethostname()}
    with open(data_dir / TEST_READS, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return table


def reads_of_test_split(data_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(data_dir) / TEST_READS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
