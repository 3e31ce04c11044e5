"""The winner, after the search is over: exported, then evaluated once on the held-out test split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from raytune_ft.config import ExperimentConfig
from raytune_ft.data import load_test_split
from raytune_ft.metrics import classification_metrics, confusion_matrix, perplexity, slice_metrics
from raytune_ft.train.batches import collate, tokenize_splits
from raytune_ft.train.evaluate import next_token_loss

BATCH = 32


@torch.no_grad()
def test_metrics(export_dir: Path, cfg: ExperimentConfig, data_dir: Path, classes: list[str] | None) -> dict[str, Any]:
    """Metrics of the exported model on the test split; the split is read here and nowhere else (the read is
    logged in the data directory's test_reads.jsonl)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    table = load_test_split(data_dir, reader=f"raytune-ft tune: winner test evaluation of {export_dir}")
    split = tokenize_splits({"test": table}, tokenizer, cfg.model.task, cfg.data.max_length, cfg.data.block_size)
    test = split["test"]
    classification = cfg.model.task == "sequence-classification"
    auto = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
    model = auto.from_pretrained(export_dir, dtype=torch.float32).eval()
    # by length, so that each batch pads little; predictions go back to their rows below
    rows = sorted(range(len(test["input_ids"])), key=lambda i: len(test["input_ids"][i]))
    preds = [0] * len(rows)  # by row index
    loss_sum, count = 0.0, 0
    for start in range(0, len(rows), BATCH):
        batch = collate(test, rows[start : start + BATCH], tokenizer.pad_token_id, torch.device("cpu"))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        if classification:
            loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            count += len(batch["labels"])
            for row, pred in zip(rows[start : start + BATCH], logits.argmax(-1).tolist(), strict=True):
                preds[row] = pred
        else:
            loss, tokens = next_token_loss(logits, batch["input_ids"], batch["attention_mask"], "sum")
            loss_sum += float(loss)
            count += tokens
    out: dict[str, Any] = {"test_rows": len(rows), "test_loss": loss_sum / max(1, count)}
    if not classification:
        out["test_perplexity"] = perplexity(out["test_loss"])
        return out
    names = list(cfg.data.label_names or classes or [])
    confusion = confusion_matrix(torch.tensor(preds), torch.tensor(test["labels"]), len(names))
    out.update({f"test_{k}": v for k, v in classification_metrics(confusion, names).items()})
    out["confusion_matrix"] = {"labels": names, "counts": confusion.tolist()}
    if "slices" in test:
        out["slices"] = slice_metrics(preds, test["labels"], test["slices"], names)
    return out
