"""Reading chat and instruction data (data/chat.py's first step): three row shapes in JSONL, Parquet, CSV or TSV,
each row one Conversation. Told apart by the columns present (first match wins): an OpenAI-style `messages` list
of {role, content}; Alpaca-style `instruction` (+ optional `input`) and `output`; `prompt` and `completion` (column
names from ChatColumns, the future data.columns.*). A CSV/TSV `messages` cell holds the list as JSON.

Errors name the file and the line (Parquet: the row), with DataError's conventions from data/readers.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from raytune_ft.data.chat_templates import ROLES, role_problems
from raytune_ft.data.readers import DataError, _decode, detect_format, existing_file, jsonl_objects

MAX_ERRORS = 5  # bad rows written out in one ChatDataError's message (all are in its `problems`)
SHAPES = ("messages", "instruction", "prompt")


class Turn(NamedTuple):
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """Turns in order, and the line (Parquet: row) of the file it came from, for messages and tracing."""

    turns: tuple[Turn, ...]
    line: int
    split_text: str | None = None  # data.columns.split_text's value: what the split compares instead of user turns
    slice: str | None = None  # data.columns.slice's value

    def messages(self) -> list[dict[str, str]]:
        return [{"role": t.role, "content": t.content} for t in self.turns]


@dataclass(frozen=True)
class ChatColumns:
    """Column names of each shape (data.columns.*)."""

    messages: str = "messages"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    prompt: str = "prompt"
    completion: str = "completion"
    split_text: str | None = None
    slice: str | None = None

    @classmethod
    def of(cls, columns: Any) -> ChatColumns:
        """From data.columns (a ColumnsConfig)."""
        names = ("messages", "instruction", "input", "output", "prompt", "completion", "split_text", "slice")
        return cls(**{name: getattr(columns, name) for name in names})


@dataclass
class ChatSource:
    path: str
    format: str
    shape: str
    conversations: list[Conversation]


class ChatDataError(DataError):
    """Every bad row of a file at once, so one fix-and-rerun round fixes them all; located at the first.
    `problems` holds each (line, message)."""

    def __init__(self, path: str | Path, problems: list[tuple[int, str]], where: str = "line") -> None:
        self.problems = problems
        line, message = problems[0]
        if len(problems) > 1:
            more = "; ".join(f"{where} {n}: {m}" for n, m in problems[1:MAX_ERRORS])
            message += (
                f" ({len(problems)} rows with problems; also {more}{'; ...' if len(problems) > MAX_ERRORS else ''})"
            )
        super().__init__(path, line, f"row {line}: {message}" if where == "row" else message)


# ---------------------------------------------------------------------------------------------------- reading


def read_conversations(path: str | Path, fmt: str = "auto", columns: ChatColumns | None = None) -> ChatSource:
    """Every conversation of the file. A file-level fault (bad JSON, a missing column, no chat columns) stops at
    once, like data/readers.py; a row-level fault (role, content, turn order) is collected over the whole file and
    raised as one ChatDataError."""
    path, columns = existing_file(path), columns or ChatColumns()
    fmt = detect_format(path, fmt)
    if fmt == "text":
        raise DataError(path, None, "plain text holds no conversations; chat data needs jsonl, parquet, csv or tsv")
    names, rows = _rows(path, fmt)
    shape = _shape(path, names, columns, 1 if fmt in ("csv", "tsv") else None)
    conversations, problems = [], []
    for line, row in rows:
        turns, row_problems = _turns(row, shape, columns, from_text=fmt in ("csv", "tsv"))
        extra = {name: _optional_text(row, getattr(columns, name), row_problems) for name in ("split_text", "slice")}
        if row_problems:
            problems.append((line, "; ".join(row_problems)))
        else:
            conversations.append(Conversation(tuple(turns), line, **extra))
    if problems:
        raise ChatDataError(path, problems, "row" if fmt == "parquet" else "line")
    if not conversations:
        raise DataError(path, None, "has no data rows")
    return ChatSource(str(path), fmt, shape, conversations)


def _rows(path: Path, fmt: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Column names (of the first row for JSONL) and each row as a dict with its line."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid and OSError variants for corrupt files
            raise DataError(path, None, f"not a readable Parquet file: {exc}") from None
        return table.column_names, [(i + 1, row) for i, row in enumerate(table.to_pylist())]
    text = _decode(path)
    if fmt == "jsonl":
        rows = list(jsonl_objects(path, text))
        return (list(rows[0][1]) if rows else []), rows
    import csv
    import io

    # unlike readers.py's TSV, quotes are honoured: a messages cell holds JSON, whose quotes a TSV writer escapes
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
    try:
        header = [h.strip() for h in next(reader)]
        rows, start = [], reader.line_num + 1
        for fields in reader:
            line, start = start, reader.line_num + 1  # a quoted record may span lines: name where it starts
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(path, line, f"expected {len(header)} fields like the header, found {len(fields)}")
            rows.append((line, dict(zip(header, fields, strict=True))))
    except csv.Error as exc:
        raise DataError(path, reader.line_num, f"malformed {fmt.upper()}: {exc}") from None
    return header, rows


def _shape(path: Path, names: list[str], columns: ChatColumns, line: int | None) -> str:
    if columns.messages in names:
        return "messages"
    if columns.instruction in names and columns.output in names:
        return "instruction"
    if columns.prompt in names and columns.completion in names:
        return "prompt"
    wanted = f"'{columns.instruction}' and '{columns.output}', or '{columns.prompt}' and '{columns.completion}'"
    raise DataError(
        path,
        line,
        f"no chat columns: expected '{columns.messages}', or {wanted} (columns: {', '.join(map(str, names))}); "
        "set data.columns.messages, data.columns.instruction/output or data.columns.prompt/completion",
    )


def _turns(row: dict[str, Any], shape: str, columns: ChatColumns, from_text: bool) -> tuple[list[Turn], list[str]]:
    """The row's turns, or what is wrong with it."""
    if shape == "messages":
        turns, problems = _message_turns(row.get(columns.messages), columns.messages, from_text)
    else:
        if shape == "instruction":
            ask, answer = columns.instruction, columns.output
        else:
            ask, answer = columns.prompt, columns.completion
        problems = [_not_text(row, name) for name in (ask, answer)]
        extra = row.get(columns.input) if shape == "instruction" else None
        if extra is not None and not isinstance(extra, str):
            problems.append(f"'{columns.input}' must be a string, got {type(extra).__name__}")
        problems = [p for p in problems if p]
        if problems:
            return [], problems
        question = row[ask] if not (extra or "").strip() else f"{row[ask]}\n\n{extra}"  # Alpaca's own layout
        turns = [Turn("user", question), Turn("assistant", row[answer])]
    if problems:
        return [], problems
    if not any(t.role == "assistant" for t in turns):
        return [], ["conversation has no assistant turn"]
    return turns, [f"conversation {p}" for p in role_problems([t.role for t in turns])]


def _optional_text(row: dict[str, Any], name: str | None, problems: list[str]) -> str | None:
    """An optional column's value as text (a number is written out); absent or null: None."""
    value = row.get(name) if name else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    problems.append(f"'{name}' must be a string, got {type(value).__name__}")
    return None


def _not_text(row: dict[str, Any], name: str) -> str | None:
    if row.get(name) is None:
        return f"no '{name}'"
    if not isinstance(row[name], str):
        return f"'{name}' must be a string, got {type(row[name]).__name__}"
    return None


def _message_turns(value: Any, name: str, from_text: bool) -> tuple[list[Turn], list[str]]:
    if value is None:
        return [], [f"no '{name}'"]
    if from_text and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            return [], [f"'{name}' is not valid JSON (column {exc.colno}: {exc.msg})"]
    if not isinstance(value, list):
        return [], [f"'{name}' must be a list of {{role, content}} objects, got {type(value).__name__}"]
    turns, problems = [], []
    for k, message in enumerate(value, 1):
        if not isinstance(message, dict):
            problems.append(f"turn {k} must be an object with 'role' and 'content', got {type(message).__name__}")
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problems.append(f"turn {k} has unknown role {role!r} (roles: {', '.join(ROLES)})")
        elif content is None:
            problems.append(f"turn {k} ({role}) has no content")
        elif not isinstance(content, str):
            problems.append(f"turn {k} ({role}): content must be a string, got {type(content).__name__}")
        else:
            turns.append(Turn(role, content))
    return turns, problems
