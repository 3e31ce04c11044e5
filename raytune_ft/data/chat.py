"""Chat and instruction data for causal LMs: read conversations, curate them, render them with a chat template and
tokenise them with labels that train on the answers only.

Not wired into the pipeline yet. Each parameter is named as the YAML key that will set it:

    data.columns.messages / .instruction / .input / .output / .prompt / .completion   -> ChatColumns
    data.chat.template       "auto" (the tokenizer's own template, else chatml), "tokenizer", "chatml", "llama3",
                             "zephyr"                                                 -> template=
    data.chat.train_on       "assistant" (default: loss on answers only) or "all"    -> train_on=
    data.chat.max_tokens     longest conversation in tokens, None for no limit       -> max_tokens=
    data.chat.length_policy  "truncate" (default) or "drop"                          -> length_policy=
    data.curation.dedupe / .normalize   as for plain text, on whole conversations     -> dedupe=, normalize=

Three row shapes, told apart by the columns present (first match wins): an OpenAI-style `messages` list of
{role, content}; Alpaca-style `instruction` (+ optional `input`) and `output`; `prompt` and `completion`. Any of
them in JSONL, Parquet, CSV or TSV (a CSV/TSV `messages` cell holds the list as JSON). All become Conversations.

Splits: a conversation is one unit. `as_records` gives the split a Records of one text per conversation
(`split_text`: its user turns joined), so the overlap-aware split groups conversations that ask the same thing;
`take_by_lines` maps a split's rows back to conversations.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from raytune_ft.config.schema import NormalizeConfig
from raytune_ft.data import curation
from raytune_ft.data.chat_templates import DEFAULT_TEMPLATE, ROLES, TEMPLATES, role_problems
from raytune_ft.data.readers import DataError, Records, _decode, detect_format
from raytune_ft.errors import InputError

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and so Hugging Face's LM loss) skips
MAX_ERRORS = 5
TRAIN_ON = ("assistant", "all")
LENGTH_POLICIES = ("truncate", "drop")
SHAPES = ("messages", "instruction", "prompt")


class Turn(NamedTuple):
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """Turns in order, and the line (Parquet: row) of the file it came from, for messages and tracing."""

    turns: tuple[Turn, ...]
    line: int

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


@dataclass
class ChatSource:
    path: str
    format: str
    shape: str
    conversations: list[Conversation]


@dataclass
class ChatRows:
    """What training needs: conversations and, row for row, token ids and labels (IGNORE_INDEX where not learned)."""

    conversations: list[Conversation]
    input_ids: list[list[int]]
    labels: list[list[int]]
    report: dict[str, Any] = field(default_factory=dict)


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
    path, columns = Path(path), columns or ChatColumns()
    if not path.exists():
        raise DataError(path, None, "file not found")
    if not path.is_file():
        raise DataError(path, None, "is not a file")
    fmt = detect_format(path, fmt)
    if fmt == "text":
        raise DataError(path, None, "plain text holds no conversations; chat data needs jsonl, parquet, csv or tsv")
    names, rows = _rows(path, fmt)
    shape = _shape(path, names, columns, 1 if fmt in ("csv", "tsv") else None)
    conversations, problems = [], []
    for line, row in rows:
        turns, row_problems = _turns(row, shape, columns, from_text=fmt in ("csv", "tsv"))
        if row_problems:
            problems.append((line, "; ".join(row_problems)))
        else:
            conversations.append(Conversation(tuple(turns), line))
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
        rows = []
        for line_no, line in enumerate(text.split("\n"), 1):  # \n only: U+2028 is legal inside JSON strings
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, line_no, f"invalid JSON at column {exc.colno}: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise DataError(path, line_no, f"expected a JSON object per line, got {type(obj).__name__}")
            rows.append((line_no, obj))
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


# --------------------------------------------------------------------------------------------------- curation


def conversation_key(conversation: Conversation, normalize: Callable[[str], str] = curation.exact) -> str:
    """The whole conversation (roles and contents) under NORMALIZE, the identity de-duplication compares."""
    return "\x1e".join(f"{t.role}\x1f{normalize(t.content)}" for t in conversation.turns)


def drop_empty_answers(conversations: list[Conversation]) -> tuple[list[Conversation], curation.StepReport]:
    """Cut each conversation before its first empty answer, dropping the question that went unanswered; a
    conversation left without an answer is removed. Cut rather than skip the exchange: later turns may build on
    the missing answer, so what follows it is not a coherent conversation."""
    kept, cut = [], 0
    for conversation in conversations:
        turns = conversation.turns
        empty = next((i for i, t in enumerate(turns) if t.role == "assistant" and not t.content.strip()), None)
        if empty is None:
            kept.append(conversation)
            continue
        turns = turns[: max(empty - 1, 0)]  # the turn before an answer is its question (role rules)
        if any(t.role == "assistant" for t in turns):
            kept.append(Conversation(turns, conversation.line))
            cut += 1
    details = {"cut": cut, "no_answer_left": len(conversations) - len(kept)}
    return kept, curation.StepReport("drop_empty_answers", len(conversations), len(kept), details)


def dedupe_conversations(
    conversations: list[Conversation], normalize: Callable[[str], str], name: str
) -> tuple[list[Conversation], curation.StepReport]:
    """Keep the first conversation of each key; later ones with the same whole conversation are removed."""
    seen: set[str] = set()
    kept = []
    for conversation in conversations:
        key = conversation_key(conversation, normalize)
        if key not in seen:
            seen.add(key)
            kept.append(conversation)
    return kept, curation.StepReport(name, len(conversations), len(kept))


def curate_conversations(
    conversations: list[Conversation], dedupe: str = "normalized", normalize: NormalizeConfig | None = None
) -> tuple[list[Conversation], list[curation.StepReport]]:
    """Empty answers, then exact and (with dedupe="normalized") normalised de-duplication, as for plain text."""
    steps = []
    conversations, step = drop_empty_answers(conversations)
    steps.append(step)
    if dedupe in ("exact", "normalized"):
        conversations, step = dedupe_conversations(conversations, curation.exact, "dedupe_exact")
        steps.append(step)
    if dedupe == "normalized":
        key = curation.normalizer(normalize or NormalizeConfig())
        conversations, step = dedupe_conversations(conversations, key, "dedupe_normalized")
        steps.append(step)
    return conversations, steps


# ------------------------------------------------------------------------------------------------- rendering


@dataclass
class TokenizedChat:
    """One conversation's tokens. `answer_ends[k]` is the token count through assistant turn k (the places a
    conversation can be cut whole), `answer_turns[k]` that turn's index in the conversation."""

    input_ids: list[int]
    labels: list[int]
    answer_ends: list[int]
    answer_turns: list[int]


def resolve_template(tokenizer: Any, template: str = "auto") -> tuple[str, str]:
    """(name, Jinja source) of the template to render with: "auto" is the tokenizer's own when it has one, else
    chatml; "tokenizer" insists on the tokenizer's own; a name from TEMPLATES is that template, even when the
    tokenizer has its own (a base model's tokenizer may ship one the fine-tune should not follow)."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one is for chat
        own = own.get("default")
    if template in ("auto", "tokenizer") and own:
        return "tokenizer", own
    if template == "auto":
        return DEFAULT_TEMPLATE, TEMPLATES[DEFAULT_TEMPLATE]
    if template == "tokenizer":
        raise InputError(
            f"data.chat.template is 'tokenizer' but the tokenizer has no chat template; name one of "
            f"{', '.join(TEMPLATES)}"
        )
    if template not in TEMPLATES:
        raise InputError(f"unknown data.chat.template {template!r}; use auto, tokenizer, {', '.join(TEMPLATES)}")
    return template, TEMPLATES[template]


def _render(tokenizer: Any, jinja: str, turns: tuple[Turn, ...], generation_prompt: bool) -> str:
    messages = [{"role": t.role, "content": t.content} for t in turns]
    return tokenizer.apply_chat_template(
        messages, chat_template=jinja, tokenize=False, add_generation_prompt=generation_prompt
    )


def tokenize_conversation(
    conversation: Conversation, tokenizer: Any, jinja: str, train_on: str = "assistant", source: str = ""
) -> TokenizedChat:
    """Render, tokenise, and label the answers. Each answer's text is found by rendering prefixes: the
    conversation before assistant turn i with the generation prompt, and through turn i; the answer is what the
    second adds to the first, less the whitespace around it (a template's separator is not learned). This works for
    any template that renders a conversation's beginning the same whatever follows (checked: each prefix must be a
    prefix of the whole text). Tokens are matched to the answers by character offsets of one tokenisation of the
    whole text, so the tokenizer need not split a prefix as it splits the whole. Each answer's end-of-turn token,
    which the model must learn to emit to stop, is part of what turn i adds, so it is learned too."""
    turns = conversation.turns
    whole = _render(tokenizer, jinja, turns, False)
    spans, ends, answer_turns = [], [], []
    for i, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        before = _render(tokenizer, jinja, turns[:i], True)
        through = _render(tokenizer, jinja, turns[: i + 1], False)
        if not (whole.startswith(through) and through.startswith(before)):
            raise DataError(
                source,
                conversation.line,
                f"the chat template renders the conversation up to turn {i + 1} differently from the beginning of the "
                "whole conversation (or the generation prompt differently from the answer's header), so the answers "
                "cannot be located for loss masking; templates that rewrite earlier turns (dropping reasoning, "
                "dating the system prompt by the last turn) do this: set data.chat.template to chatml, llama3 or "
                "zephyr, or data.chat.train_on to all",
            )
        added = through[len(before) :]
        spans.append(
            (len(before) + len(added) - len(added.lstrip()), len(through) - (len(added) - len(added.rstrip())))
        )
        ends.append(len(through))
        answer_turns.append(i)
    try:
        enc = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise InputError("chat data needs a fast tokenizer (character offsets); this one is a slow one") from None
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [
            token if any(_inside(start, end, a, b) for a, b in spans) else IGNORE_INDEX
            for token, (start, end) in zip(ids, offsets, strict=True)
        ]
    # tokens that start before a turn's end belong to it: the cut after turn k keeps exactly those
    answer_ends = [sum(1 for start, _ in offsets if start < end) for end in ends]
    return TokenizedChat(ids, labels, answer_ends, answer_turns)


def _inside(start: int, end: int, a: int, b: int) -> bool:
    """Does token [start, end) overlap the answer [a, b)? (A zero-width token counts where it stands.)"""
    return (start < b and end > a) if end > start else a <= start < b


# ---------------------------------------------------------------------------------------------- length, rows


def apply_length_policy(
    conversations: list[Conversation], tokenized: list[TokenizedChat], max_tokens: int | None, policy: str
) -> tuple[list[Conversation], list[TokenizedChat], curation.StepReport]:
    """Conversations longer than MAX_TOKENS: "drop" removes them; "truncate" cuts after the last whole answer
    that fits (never inside a turn: a cut answer would teach the model to stop mid-sentence, or never to stop), and
    removes a conversation whose first answer does not fit."""
    kept: list[Conversation] = []
    kept_tokens: list[TokenizedChat] = []
    too_long = first_answer_too_long = truncated = 0
    for conversation, chat in zip(conversations, tokenized, strict=True):
        if max_tokens is None or len(chat.input_ids) <= max_tokens:
            kept.append(conversation)
            kept_tokens.append(chat)
            continue
        if policy == "drop":
            too_long += 1
            continue
        fits = [k for k, end in enumerate(chat.answer_ends) if end <= max_tokens]
        if not fits:
            first_answer_too_long += 1
            continue
        k, n = fits[-1], chat.answer_ends[fits[-1]]
        truncated += 1
        kept.append(Conversation(conversation.turns[: chat.answer_turns[k] + 1], conversation.line))
        kept_tokens.append(
            TokenizedChat(chat.input_ids[:n], chat.labels[:n], chat.answer_ends[: k + 1], chat.answer_turns[: k + 1])
        )
    details: dict[str, Any] = {"max_tokens": max_tokens, "policy": policy}
    if policy == "drop":
        details["too_long"] = too_long
    else:
        details.update(truncated=truncated, first_answer_too_long=first_answer_too_long)
    step = curation.StepReport(f"length_{policy}", len(conversations), len(kept), details)
    return kept, kept_tokens, step


def build_chat_rows(
    conversations: list[Conversation],
    tokenizer: Any,
    *,
    template: str = "auto",
    train_on: str = "assistant",
    max_tokens: int | None = None,
    length_policy: str = "truncate",
    source: str = "",
) -> ChatRows:
    """Tokenise and label curated conversations, then apply the length policy. The report holds the template used,
    the length step (a curation StepReport, to join the data report's steps) and the token counts."""
    if train_on not in TRAIN_ON:
        raise InputError(f"unknown data.chat.train_on {train_on!r}; use {' or '.join(TRAIN_ON)}")
    if length_policy not in LENGTH_POLICIES:
        raise InputError(f"unknown data.chat.length_policy {length_policy!r}; use {' or '.join(LENGTH_POLICIES)}")
    if max_tokens is not None and max_tokens < 1:
        raise InputError(f"data.chat.max_tokens must be at least 1, got {max_tokens}")
    name, jinja = resolve_template(tokenizer, template)
    tokenized = [tokenize_conversation(c, tokenizer, jinja, train_on, source) for c in conversations]
    before = sum(len(t.input_ids) for t in tokenized)
    conversations, tokenized, step = apply_length_policy(conversations, tokenized, max_tokens, length_policy)
    report = {
        "chat": {"template": name, "train_on": train_on, "max_tokens": max_tokens, "length_policy": length_policy},
        "steps": [step.as_dict()],
        "tokens": {
            "before": before,
            "after": sum(len(t.input_ids) for t in tokenized),
            "trained": sum(1 for t in tokenized for label in t.labels if label != IGNORE_INDEX),
        },
    }
    return ChatRows(conversations, [t.input_ids for t in tokenized], [t.labels for t in tokenized], report)


def prepare_chat(
    path: str | Path,
    tokenizer: Any,
    *,
    fmt: str = "auto",
    columns: ChatColumns | None = None,
    dedupe: str = "normalized",
    normalize: NormalizeConfig | None = None,
    template: str = "auto",
    train_on: str = "assistant",
    max_tokens: int | None = None,
    length_policy: str = "truncate",
) -> ChatRows:
    """Read, curate, tokenise: the whole chat data path for one file (before any split). The report's "steps" are
    in the order applied, each with rows_in, rows_out, removed and its reasons, like the data report's."""
    source = read_conversations(path, fmt, columns)
    conversations, steps = curate_conversations(source.conversations, dedupe, normalize)
    if not conversations:
        raise DataError(path, None, "no conversations left after curation; every answer was empty or repeated")
    rows = build_chat_rows(
        conversations,
        tokenizer,
        template=template,
        train_on=train_on,
        max_tokens=max_tokens,
        length_policy=length_policy,
        source=str(path),
    )
    if not rows.conversations:
        raise DataError(path, None, f"no conversations fit data.chat.max_tokens {max_tokens}")
    rows.report = {
        "source": {
            "path": source.path,
            "format": source.format,
            "shape": source.shape,
            "rows_read": len(source.conversations),
        },
        "chat": rows.report["chat"],
        "steps": [s.as_dict() for s in steps] + rows.report["steps"],
        "tokens": rows.report["tokens"],
    }
    return rows


# ----------------------------------------------------------------------------------------------------- split


def split_text(conversation: Conversation) -> str:
    """The text the split and its overlap check see for a conversation: its user turns joined. Questions, not
    answers or system prompts: two conversations asking the same thing must land in one split whatever they
    answer, and a system prompt shared by every row would make them all look alike."""
    return "\n".join(t.content for t in conversation.turns if t.role == "user")


def as_records(conversations: list[Conversation]) -> Records:
    """One Records row per conversation (split_text, source line) for data/split.py's split_records."""
    return Records([split_text(c) for c in conversations], None, [c.line for c in conversations])


def take_by_lines(conversations: list[Conversation], records: Records) -> list[Conversation]:
    """The conversations a split's Records holds, by source line (one conversation per line or row)."""
    by_line = {c.line: c for c in conversations}
    return [by_line[line] for line in records.rows]
