"""Tokenisation with the model's tokenizer: classification rows, causal-LM blocks, and the token statistics of the
data report."""

from __future__ import annotations

import statistics
from typing import Any


def tokenize_classification(texts: list[str], label_ids: list[int], tokenizer: Any, max_length: int) -> dict:
    """Truncate to max_length, no padding: batches are padded per batch by the training collator."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": list(label_ids)}


def tokenize_causal_blocks(texts: list[str], tokenizer: Any, block_size: int) -> dict:
    """Concatenate documents (EOS between them) and cut fixed blocks; the tail shorter than a block is dropped."""
    stream: list[int] = []
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    blocks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def length_stats(lengths: list[int]) -> dict[str, Any]:
    """Mean, median, 95th percentile and maximum of a non-empty list of lengths (tokens or words)."""
    lengths = sorted(lengths)
    return {
        "mean": round(statistics.fmean(lengths), 2),
        "p50": lengths[len(lengths) // 2],
        "p95": lengths[min(len(lengths) - 1, int(len(lengths) * 0.95))],
        "max": lengths[-1],
    }


def token_stats(texts: list[str], tokenizer: Any, max_length: int | None, block_size: int | None) -> dict[str, Any]:
    """Token-length distribution; for classification how many rows max_length truncates, for LM how many blocks."""
    if not texts:
        return {"rows": 0}
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]]
    stats: dict[str, Any] = {"total": sum(lengths), **length_stats(lengths)}
    if max_length is not None:
        truncated = sum(1 for n in lengths if n > max_length)
        stats.update(
            max_length=max_length, truncated_rows=truncated, truncated_fraction=round(truncated / len(lengths), 4)
        )
    if block_size is not None:
        stats.update(block_size=block_size, blocks=stats["total"] // block_size)
    return stats
