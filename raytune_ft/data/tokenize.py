"""Tokenisation with the model's tokenizer, and Ray Datasets that Ray Train shards across workers.

The same batch functions run in-process (for the data report) and inside Ray Data tasks (for training).
"""

from __future__ import annotations

import functools
import statistics
from pathlib import Path
from typing import Any

from raytune_ft.model_source import load_tokenizer


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


def token_stats(texts: list[str], tokenizer: Any, max_length: int | None, block_size: int | None) -> dict[str, Any]:
    """Token-length distribution; for classification how many rows max_length truncates, for LM how many blocks."""
    if not texts:
        return {"rows": 0}
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]]
    lengths.sort()
    stats: dict[str, Any] = {
        "total": sum(lengths),
        "mean": round(statistics.fmean(lengths), 2),
        "p50": lengths[len(lengths) // 2],
        "p95": lengths[min(len(lengths) - 1, int(len(lengths) * 0.95))],
        "max": lengths[-1],
    }
    if max_length is not None:
        truncated = sum(1 for n in lengths if n > max_length)
        stats.update(
            max_length=max_length, truncated_rows=truncated, truncated_fraction=round(truncated / len(lengths), 4)
        )
    if block_size is not None:
        stats.update(block_size=block_size, blocks=stats["total"] // block_size)
    return stats


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(model_ref: str) -> Any:
    return load_tokenizer(model_ref)


def _tokenize_arrow_batch(batch: Any, model_ref: str, task: str, max_length: int, block_size: int) -> Any:
    import pyarrow as pa

    tokenizer = _cached_tokenizer(model_ref)
    texts = batch.column("text").to_pylist()
    if task == "causal-lm":
        out = tokenize_causal_blocks(texts, tokenizer, block_size)
    else:
        out = tokenize_classification(texts, batch.column("label_id").to_pylist(), tokenizer, max_length)
    ids = pa.list_(pa.int32())
    return pa.table(
        {k: pa.array(v, type=pa.int64() if k == "labels" and task != "causal-lm" else ids) for k, v in out.items()}
    )


def ray_datasets(
    data_dir: str | Path,
    model_ref: str,
    task: str,
    max_length: int,
    block_size: int,
    splits: tuple[str, ...] = ("train", "validation"),
) -> dict[str, Any]:
    """Tokenised Ray Datasets of the prepared splits. Pass them to TorchTrainer(datasets=...) and each worker
    reads its own shard with ray.train.get_dataset_shard(name). The test split is never offered here."""
    import ray.data

    if "test" in splits:
        raise ValueError("the test split is read once, by the final evaluation (load_test_split), not by training")
    datasets = {}
    for name in splits:
        path = Path(data_dir) / f"{name}.parquet"
        columns = ["text"] + ([] if task == "causal-lm" else ["label_id"])
        ds = ray.data.read_parquet(str(path)).select_columns(columns)
        datasets[name] = ds.map_batches(
            _tokenize_arrow_batch,
            batch_format="pyarrow",
            batch_size=1024,
            fn_kwargs={"model_ref": model_ref, "task": task, "max_length": max_length, "block_size": block_size},
        )
    return datasets
