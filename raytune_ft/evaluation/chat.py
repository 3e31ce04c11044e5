"""The chat pieces of `raytune-ft eval` (evaluation/runner.py runs them): each conversation's prompt and reference,
answer scores per slice, the answer-token loss, and the examples a reader looks at first.

A conversation is judged on its LAST answer: the turns before it are the prompt (rendered with the export's own
template, as training and serving render it), that answer's content the reference. Earlier answers stay in the
prompt as the conversation's history, so a multi-turn conversation tests answering in context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raytune_ft.data.chat import IGNORE_INDEX, tokenize_conversation
from raytune_ft.data.chat_readers import ChatColumns, Conversation, _rows
from raytune_ft.data.readers import DataError, detect_format
from raytune_ft.evaluation.scoring import length_bucket
from raytune_ft.metrics import ANSWER_METRICS, mean_answer_scores, perplexity

EXAMPLES = 10  # rows shown in the report's "first" examples


@dataclass
class ChatCase:
    """One conversation as eval sees it: the messages before its last answer, and that answer."""

    line: int
    messages: list[dict[str, str]]
    reference: str

    @property
    def question(self) -> str:
        """The last user turn: what a reader of the report needs to judge the answer."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

    @property
    def prompt_text(self) -> str:
        """Every prompt turn's content, joined: the text whose length the length slices bucket."""
        return "\n".join(m["content"] for m in self.messages)


def chat_columns(columns: dict[str, Any]) -> ChatColumns:
    """ChatColumns from the experiment's data.columns (its names for the messages, instruction, ... columns)."""
    fields = ChatColumns.__dataclass_fields__
    return ChatColumns(**{k: v for k, v in columns.items() if k in fields and isinstance(v, str)})


def chat_case(conversation: Conversation) -> ChatCase:
    """Split CONVERSATION at its last assistant turn (the reader guarantees it has one, after a user turn)."""
    last = max(i for i, t in enumerate(conversation.turns) if t.role == "assistant")
    before = conversation.messages()[:last]
    return ChatCase(conversation.line, before, conversation.turns[last].content)


def slice_values(path: Path, column: str) -> dict[int, str]:
    """The raw value of COLUMN in each row of the data file, by line (Parquet: row), the key Conversation.line
    holds; a row without it gets "(missing)". A column in no row at all is an error: a misspelt --slice."""
    _, rows = _rows(path, detect_format(path, "auto"))
    if not any(column in row for _, row in rows):
        raise DataError(path, None, f"no column '{column}' for --slice")
    return {line: "(missing)" if row.get(column) is None else str(row[column]) for line, row in rows}


def score_slices(columns: dict[str, list[str]], scores: list[dict[str, float]]) -> dict[str, Any]:
    """Per column: each value's rows and mean answer scores, the worst and best value by token F1 and the gap.
    Ties go to the first value in sorted order, so the report does not change between runs."""
    out: dict[str, Any] = {}
    for column, values in columns.items():
        groups: dict[str, list[dict[str, float]]] = {}
        for value, row in zip(values, scores, strict=True):
            groups.setdefault(value, []).append(row)
        per_value = {
            value: {"rows": len(groups[value]), **mean_answer_scores(groups[value], list(ANSWER_METRICS))}
            for value in sorted(groups)
        }
        worst = min(per_value, key=lambda v: per_value[v]["token_f1"])
        best = max(per_value, key=lambda v: per_value[v]["token_f1"])
        out[column] = {
            "slices": per_value,
            "worst_slice": worst,
            "best_slice": best,
            "token_f1_gap": per_value[best]["token_f1"] - per_value[worst]["token_f1"],
        }
    return out


def length_slices(cases: list[ChatCase]) -> list[str]:
    """Each case's prompt length bucket (words of its turns' contents, the template's markers not counted)."""
    return [length_bucket(case.prompt_text) for case in cases]


def examples(
    cases: list[ChatCase], answers: list[str], scores: list[dict[str, float]], worst: int
) -> dict[str, list[dict[str, Any]]]:
    """The first EXAMPLES rows as they come, and the WORST rows by token F1 (ties: file order): the first show
    what typical answers look like, the worst where to look for a failure."""

    def row(i: int) -> dict[str, Any]:
        case = cases[i]
        return {"row": case.line, "prompt": case.question, "reference": case.reference, "answer": answers[i]} | {
            name: scores[i][name] for name in ANSWER_METRICS
        }

    order = sorted(range(len(cases)), key=lambda i: (scores[i]["token_f1"], i))
    return {"first": [row(i) for i in range(min(EXAMPLES, len(cases)))], "worst": [row(i) for i in order[:worst]]}


@torch.inference_mode()
def answer_loss(
    net: Any, tokenizer: Any, conversations: list[Conversation], max_tokens: int, batch_size: int = 8
) -> dict[str, Any]:
    """Next-token cross-entropy on every answer token of the conversations (labels as training builds them: the
    answers and their end-of-turn tokens, data/chat.py), and its perplexity. A conversation longer than MAX_TOKENS
    is scored on its first MAX_TOKENS tokens, no more than training saw of it."""
    jinja = tokenizer.chat_template
    if not jinja:
        raise ValueError(
            "the export's tokenizer has no chat template: a chat export is saved with the one it trained on"
        )
    rows = []
    for conversation in conversations:
        chat = tokenize_conversation(conversation, tokenizer, jinja, "assistant")
        rows.append((chat.input_ids[:max_tokens], chat.labels[:max_tokens]))
    rows.sort(key=lambda r: len(r[0]))  # similar lengths share a batch: less padding
    device = next(net.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch], device=device)
        labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in batch], device=device)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch], device=device)
        logits = net(input_ids=ids, attention_mask=mask).logits
        # token t is predicted from the tokens before it: logits at t-1 against the label at t
        targets = labels[:, 1:].reshape(-1)
        loss_sum += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)), targets, ignore_index=IGNORE_INDEX, reduction="sum"
            )
        )
        tokens += int((targets != IGNORE_INDEX).sum())
    if not tokens:  # every answer cut off by MAX_TOKENS: no loss to report (None would not render as a number)
        return {"tokens": 0}
    mean = loss_sum / tokens
    return {"loss": mean, "perplexity": perplexity(mean) if math.isfinite(mean) else float("inf"), "tokens": tokens}
