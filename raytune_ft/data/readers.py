"""Readers for TSV, CSV, JSONL, Parquet and plain text into one in-memory Records shape.

Every error names the file and the line (or Parquet row) that is wrong.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytune_ft.errors import RaytuneFtError

FORMATS_BY_SUFFIX = {
    ".tsv": "tsv",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".text": "text",
}


class DataError(RaytuneFtError, ValueError):
    """Bad input data; the message starts with FILE:LINE when a line is known."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


@dataclass
class Records:
    """Texts with optional labels; `rows` keeps each record's source line for messages and tracing."""

    texts: list[str]
    labels: list[str] | None
    rows: list[int]
    slices: list[str] | None = None  # value of data.columns.slice per row, for per-slice metrics
    whole: list[bool] | None = None  # no other row contains this one (set by the split, data/overlap.py)
    messages: list[str] | None = None  # chat: each row's conversation, its turns as JSON (data/chat.py)

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices: list[int]) -> Records:
        return Records(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices] if self.labels is not None else None,
            rows=[self.rows[i] for i in indices],
            slices=[self.slices[i] for i in indices] if self.slices is not None else None,
            whole=[self.whole[i] for i in indices] if self.whole is not None else None,
            messages=[self.messages[i] for i in indices] if self.messages is not None else None,
        )


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    fmt = FORMATS_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(FORMATS_BY_SUFFIX))
        raise DataError(path, None, f"cannot tell the format from suffix '{path.suffix}' ({known}); set data.format")
    return fmt


def existing_file(path: str | Path) -> Path:
    """PATH, or the error a reader gives for a data file that is missing or not a file."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "file not found")
    if not path.is_file():
        raise DataError(path, None, "is not a file")
    return path


def read_records(
    path: str | Path, fmt: str, text_column: str, label_column: str | None, slice_column: str | None = None
) -> Records:
    """Read every record; `label_column=None` reads texts only (causal LM)."""
    path = existing_file(path)
    fmt = detect_format(path, fmt)
    if fmt == "parquet":
        records = _read_parquet(path, text_column, label_column, slice_column)
    else:
        text = _decode(path)
        if fmt in ("tsv", "csv"):
            records = _read_delimited(path, text, fmt, text_column, label_column, slice_column)
        elif fmt == "jsonl":
            records = _read_jsonl(path, text, text_column, label_column, slice_column)
        else:
            if label_column is not None:
                raise DataError(
                    path, None, "plain text has no labels; sequence-classification needs tsv, csv, jsonl or parquet"
                )
            records = _read_text(text)
    if len(records) == 0:
        raise DataError(path, None, "has no data rows")
    return records


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]  # so error positions count from the first character
    if not raw.strip():
        raise DataError(path, None, "file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            path, line, f"invalid UTF-8 byte 0x{raw[exc.start]:02x} at column {column}; save the file as UTF-8"
        ) from None


def label_text(value: Any) -> str:
    """One spelling per label whatever the file format: 1, 1.0 and "1" are all "1"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _missing_column(path: Path, line: int | None, column: str, available: list[str], role: str) -> DataError:
    return DataError(
        path, line, f"no {role} column '{column}' (columns: {', '.join(map(str, available))}); set data.columns.{role}"
    )


def _read_delimited(
    path: Path, text: str, fmt: str, text_column: str, label_column: str | None, slice_column: str | None
) -> Records:
    # SST-2 style TSV files carry quotes inside sentences, so TSV is read without quote handling.
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(path, None, "file is empty") from None
    header = [h.strip() for h in header]
    for column, role in ((text_column, "text"), (label_column, "label"), (slice_column, "slice")):
        if column is not None and column not in header:
            raise _missing_column(path, 1, column, header, role)
    t_idx = header.index(text_column)
    l_idx = header.index(label_column) if label_column is not None else None
    s_idx = header.index(slice_column) if slice_column is not None else None
    texts, labels, rows = [], [] if l_idx is not None else None, []
    slices: list[str] | None = [] if s_idx is not None else None
    start = reader.line_num + 1
    try:
        for fields in reader:
            # a quoted CSV record may span lines: name the line where it starts
            line, start = start, reader.line_num + 1
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(path, line, f"expected {len(header)} fields like the header, found {len(fields)}")
            texts.append(fields[t_idx])
            rows.append(line)
            if labels is not None:
                value = fields[l_idx].strip()
                if not value:
                    raise DataError(path, line, f"empty label in column '{label_column}'")
                labels.append(value)
            if slices is not None:
                slices.append(fields[s_idx].strip())
    except csv.Error as exc:
        raise DataError(path, reader.line_num, f"malformed {fmt.upper()}: {exc}") from None
    return Records(texts, labels, rows, slices)


def jsonl_objects(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file's TEXT; anything but an object is an error
    naming the line."""
    # split on \n only: U+2028 and friends are legal unescaped inside JSON strings
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, line_no, f"invalid JSON at column {exc.colno}: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(path, line_no, f"expected a JSON object per line, got {type(obj).__name__}")
        yield line_no, obj


def _read_jsonl(path: Path, text: str, text_column: str, label_column: str | None, slice_column: str | None) -> Records:
    texts, labels, rows = [], [] if label_column is not None else None, []
    slices: list[str] | None = [] if slice_column is not None else None
    for line_no, obj in jsonl_objects(path, text):
        if text_column not in obj:
            raise _missing_column(path, line_no, text_column, list(obj), "text")
        if not isinstance(obj[text_column], str):
            raise DataError(path, line_no, f"'{text_column}' must be a string, got {type(obj[text_column]).__name__}")
        texts.append(obj[text_column])
        rows.append(line_no)
        if labels is not None:
            if label_column not in obj:
                raise _missing_column(path, line_no, label_column, list(obj), "label")
            if obj[label_column] is None or isinstance(obj[label_column], (dict, list)):
                raise DataError(path, line_no, f"'{label_column}' must be a single value, got {obj[label_column]!r}")
            labels.append(label_text(obj[label_column]))
        if slices is not None:
            if slice_column not in obj:
                raise _missing_column(path, line_no, slice_column, list(obj), "slice")
            value = obj[slice_column]
            slices.append("" if value is None else label_text(value))
    return Records(texts, labels, rows, slices)


def _read_parquet(path: Path, text_column: str, label_column: str | None, slice_column: str | None) -> Records:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and OSError variants for corrupt files
        raise DataError(path, None, f"not a readable Parquet file: {exc}") from None
    for column, role in ((text_column, "text"), (label_column, "label"), (slice_column, "slice")):
        if column is not None and column not in schema.names:
            raise _missing_column(path, None, column, schema.names, role)
    wanted = [text_column] + [c for c in (label_column, slice_column) if c]
    table = pq.read_table(path, columns=wanted)
    texts = table.column(text_column).to_pylist()
    for i, value in enumerate(texts):
        if not isinstance(value, str):
            raise DataError(path, i + 1, f"row {i + 1}: '{text_column}' must be a string, got {value!r}")
    labels = None
    if label_column:
        raw = table.column(label_column).to_pylist()
        for i, value in enumerate(raw):
            if value is None:
                raise DataError(path, i + 1, f"row {i + 1}: '{label_column}' is null")
        labels = [label_text(v) for v in raw]
    slices = None
    if slice_column:
        slices = ["" if v is None else label_text(v) for v in table.column(slice_column).to_pylist()]
    return Records(texts, labels, list(range(1, len(texts) + 1)), slices)


_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")


def _read_text(text: str) -> Records:
    """One record per paragraph (blank-line separated), so curation and splits work on documents."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    texts, rows, line = [], [], 1
    pos = 0
    for match in [*_PARAGRAPH_BREAK.finditer(text), None]:
        end = match.start() if match else len(text)
        chunk = text[pos:end]
        if chunk.strip():
            lead = len(chunk) - len(chunk.lstrip("\n"))
            texts.append(chunk.strip("\n"))
            rows.append(line + lead)
        if match:
            line += text.count("\n", pos, match.end())
            pos = match.end()
    return Records(texts, None, rows)
