"""Chat and instruction data for causal LMs: read conversations, curate them, render them with a chat template and
tokenise them with labels that train on the answers only.

Each parameter is named as the YAML key that sets it (model.task: chat):

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from raytune_ft.config.schema import NormalizeConfig
from raytune_ft.data import curation
from raytune_ft.data.chat_readers import (
    ChatColumns,
    ChatDataError,
    ChatSource,
    Conversation,
    Turn,
    read_conversations,
)
from raytune_ft.data.chat_templates import DEFAULT_TEMPLATE, TEMPLATES
from raytune_ft.data.readers import DataError, Records
from raytune_ft.errors import InputError

# the reading side lives in data/chat_readers.py; its names are this module's too
__all__ = [
    "IGNORE_INDEX",
    "ChatColumns",
    "ChatDataError",
    "ChatRows",
    "ChatSource",
    "Conversation",
    "TokenizedChat",
    "Turn",
    "apply_length_policy",
    "as_records",
    "build_chat_rows",
    "conversation_key",
    "curate_conversations",
    "dedupe_conversations",
    "drop_empty_answers",
    "from_messages_json",
    "generation_prompt",
    "prepare_chat",
    "read_conversations",
    "resolve_template",
    "split_text",
    "take_by_lines",
    "tokenize_chat_table",
    "tokenize_conversation",
]

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and so Hugging Face's LM loss) skips
TRAIN_ON = ("assistant", "all")
LENGTH_POLICIES = ("truncate", "drop")


@dataclass
class ChatRows:
    """What training needs: conversations and, row for row, token ids and labels (IGNORE_INDEX where not learned)."""

    conversations: list[Conversation]
    input_ids: list[list[int]]
    labels: list[list[int]]
    report: dict[str, Any] = field(default_factory=dict)


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
            kept.append(replace(conversation, turns=turns))
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
    conversation: Conversation, tokenizer: Any, jinja: str, train_on: str = "assistant", source: str = "<chat>"
) -> TokenizedChat:
    """Render, tokenise, and label the answers. Each answer's text is found by rendering prefixes: the
    conversation before assistant turn i with the generation prompt, and through turn i; the answer is what the
    second adds to the first, less the whitespace around it (a template's separator is not learned). This works for
    any template that renders a conversation's beginning the same whatever follows (checked: each prefix must be a
    prefix of the whole text). Tokens are matched to the answers by character offsets of one tokenisation of the
    whole text, so the tokenizer need not split a prefix as it splits the whole. Each answer's end-of-turn token,
    which the model must learn to emit to stop, is part of what turn i adds, so it is learned too; a token that
    straddles an answer's edge (a merge of separator and answer) is learned. With train_on="all" nothing is masked
    and a template that breaks the prefix rule is accepted; its conversations can then only be kept or dropped
    whole by the length policy."""
    turns = conversation.turns
    whole = _render(tokenizer, jinja, turns, False)
    spans, ends, answer_turns = [], [], []
    for i, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        before = _render(tokenizer, jinja, turns[:i], True)
        through = _render(tokenizer, jinja, turns[: i + 1], False)
        if not (whole.startswith(through) and through.startswith(before)):
            if train_on == "all":
                # nothing to mask: the conversation is one unit, which the length policy keeps or drops whole
                spans, ends, answer_turns = [], [len(whole)], [len(turns) - 1]
                break
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
        kept.append(replace(conversation, turns=conversation.turns[: chat.answer_turns[k] + 1]))
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
    source: str = "<chat>",
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
    """The text the split and its overlap check see for a conversation: data.columns.split_text's value when the
    row has one, else its user turns joined. Questions, not answers or system prompts: two conversations asking the
    same thing must land in one split whatever they answer, and a system prompt shared by every row would make them
    all look alike."""
    if conversation.split_text is not None:
        return conversation.split_text
    return "\n".join(t.content for t in conversation.turns if t.role == "user")


def as_records(conversations: list[Conversation]) -> Records:
    """One Records row per conversation (split_text, source line, slice) for data/split.py's split_records."""
    slices = [c.slice or "" for c in conversations] if any(c.slice is not None for c in conversations) else None
    return Records([split_text(c) for c in conversations], None, [c.line for c in conversations], slices)


def from_messages_json(
    messages: list[str], lines: list[int] | None = None, slices: list[str | None] | None = None
) -> list[Conversation]:
    """Conversations back from a prepared split's `messages` column (each row's turns as JSON)."""
    out = []
    for k, text in enumerate(messages):
        turns = tuple(Turn(m["role"], m["content"]) for m in json.loads(text))
        out.append(Conversation(turns, lines[k] if lines else k + 1, slice=slices[k] if slices else None))
    return out


def generation_prompt(conversation: Conversation, tokenizer: Any, jinja: str) -> tuple[list[int], str]:
    """What generation is scored on: the prompt (every turn before the last answer, rendered with the template's
    generation prompt, as token ids) and the reference (that answer's text)."""
    last = max(i for i, t in enumerate(conversation.turns) if t.role == "assistant")
    text = _render(tokenizer, jinja, conversation.turns[:last], True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]), conversation.turns[last].content


def tokenize_chat_table(
    table: Any, tokenizer: Any, chat: Any, block_size: int, prompts: bool
) -> tuple[dict[str, list], dict[str, Any]]:
    """A prepared split (Arrow table with `messages`) as token ids and answer-only labels, cut to
    data.chat.max_tokens (default block_size) by its policy; with PROMPTS also the generation prompts and
    references. Returns the columns and the report of build_chat_rows (template, length step, token counts)."""
    lines = table.column("source_line").to_pylist() if "source_line" in table.column_names else None
    slices = table.column("slice").to_pylist() if "slice" in table.column_names else None
    conversations = from_messages_json(table.column("messages").to_pylist(), lines, slices)
    rows = build_chat_rows(
        conversations,
        tokenizer,
        template=chat.template,
        train_on=chat.train_on,
        max_tokens=chat.max_tokens or block_size,
        length_policy=chat.length_policy,
    )
    out: dict[str, list] = {"input_ids": rows.input_ids, "labels": rows.labels}
    if slices is not None:
        out["slices"] = [c.slice or "" for c in rows.conversations]
    if prompts:
        jinja = resolve_template(tokenizer, chat.template)[1]
        pairs = [generation_prompt(c, tokenizer, jinja) for c in rows.conversations]
        out["prompts"] = [ids for ids, _ in pairs]
        out["references"] = [ref for _, ref in pairs]
    return out, rows.report


def take_by_lines(conversations: list[Conversation], records: Records) -> list[Conversation]:
    """The conversations a split's Records holds, by source line (one conversation per line or row)."""
    by_line = {c.line: c for c in conversations}
    return [by_line[line] for line in records.rows]
