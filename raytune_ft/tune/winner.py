"""The winner, after the search is over: exported, then evaluated once on the held-out test split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from raytune_ft.config import ExperimentConfig
from raytune_ft.data import load_test_split
from raytune_ft.metrics import classification_metrics, confusion_matrix, perplexity, slice_metrics, whole_metrics
from raytune_ft.train.batches import collate, model_inputs, tokenize_splits
from raytune_ft.train.evaluate import label_loss, next_token_loss

BATCH = 32


@torch.no_grad()
def test_metrics(export_dir: Path, cfg: ExperimentConfig, data_dir: Path, classes: list[str] | None) -> dict[str, Any]:
    """Metrics of the exported model on the test split; the split is read here and nowhere else (the read is
    logged in the data directory's test_reads.jsonl)."""
    from transformers import AutoTokenizer

    from raytune_ft.export import load_exported_model

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    table = load_test_split(data_dir, reader=f"raytune-ft tune: winner test evaluation of {export_dir}")
    split = tokenize_splits(
        {"test": table}, tokenizer, cfg.model.task, cfg.data.max_length, cfg.data.block_size, cfg.data.chat
    )
    test = split["test"]
    classification = cfg.model.task == "sequence-classification"
    model = load_exported_model(export_dir, cfg.model.task, cfg.model.name_or_path, classes, torch.float32)
    # by length, so that each batch pads little; predictions go back to their rows below
    rows = sorted(range(len(test["input_ids"])), key=lambda i: len(test["input_ids"][i]))
    preds = [0] * len(rows)  # by row index
    loss_sum, count = 0.0, 0
    for start in range(0, len(rows), BATCH):
        batch = collate(test, rows[start : start + BATCH], tokenizer.pad_token_id, torch.device("cpu"))
        logits = model(**model_inputs(batch)).logits.float()
        if classification:
            loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            count += len(batch["labels"])
            for row, pred in zip(rows[start : start + BATCH], logits.argmax(-1).tolist(), strict=True):
                preds[row] = pred
        else:
            if "labels" in batch:  # chat: the answers' tokens
                loss, tokens = label_loss(logits, batch["labels"], "sum")
            else:
                loss, tokens = next_token_loss(logits, batch["input_ids"], batch["attention_mask"], "sum")
            loss_sum += float(loss)
            count += tokens
    out: dict[str, Any] = {"test_rows": len(rows), "test_loss": loss_sum / max(1, count)}
    if not classification:
        out["test_perplexity"] = perplexity(out["test_loss"])
        if cfg.model.task == "chat":
            out.update(_generation_test_metrics(model, tokenizer, test, cfg))
        return out | _task_test_metrics(export_dir, cfg)
    names = list(cfg.data.label_names or classes or [])
    confusion = confusion_matrix(torch.tensor(preds), torch.tensor(test["labels"]), len(names))
    out.update({f"test_{k}": v for k, v in classification_metrics(confusion, names).items()})
    out["confusion_matrix"] = {"labels": names, "counts": confusion.tolist()}
    if "slices" in test:
        out["slices"] = slice_metrics(preds, test["labels"], test["slices"], names)
    if "whole" in test:
        out.update({f"test_{k}": v for k, v in whole_metrics(preds, test["labels"], test["whole"], names).items()})
    out.update(_task_test_metrics(export_dir, cfg))
    return out


def _generation_test_metrics(model: Any, tokenizer: Any, test: dict[str, list], cfg: ExperimentConfig) -> dict:
    """test_gen_<metric> over every test conversation's last answer (greedy, train.generation.max_new_tokens),
    per data.columns.slice value under "gen_slices", and the first answers beside their references."""
    from raytune_ft.generation import answer_text, greedy_answers, stop_ids
    from raytune_ft.metrics import answer_scores, mean_answer_scores

    gen = cfg.train.generation
    ids = greedy_answers(
        model,
        test["prompts"],
        max_new_tokens=gen.max_new_tokens,
        stop=stop_ids(tokenizer),
        pad_id=tokenizer.pad_token_id,
        batch_size=BATCH,
    )
    answers = [answer_text(tokenizer, row) for row in ids]
    scores = answer_scores(answers, test["references"])
    out: dict[str, Any] = {f"test_gen_{k}": v for k, v in mean_answer_scores(scores, list(gen.metrics)).items()}
    if "slices" in test:
        out["gen_slices"] = {
            value: {"rows": sum(1 for v in test["slices"] if v == value)}
            | mean_answer_scores([r for r, v in zip(scores, test["slices"], strict=True) if v == value], gen.metrics)
            for value in sorted(set(test["slices"]))
        }
    out["gen_examples"] = [
        {"prompt": tokenizer.decode(p, skip_special_tokens=False)[-300:], "reference": r, "answer": a}
        for p, r, a in list(zip(test["prompts"], test["references"], answers, strict=True))[:10]
    ]
    return out


def _task_test_metrics(export_dir: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """test_<task>_accuracy and _f1_macro for each extra classification task of a multi-task export, each on its
    own test split (read here once, like the primary's)."""
    from raytune_ft.data import data_dir_for
    from raytune_ft.evaluation.scoring import standard_metrics
    from raytune_ft.serve.model import LoadedModel

    extra = [t for t in cfg.tasks if t.task == "sequence-classification"]
    if not extra:
        return {}
    model = LoadedModel(export_dir)
    out: dict[str, Any] = {}
    for task in extra:
        table = load_test_split(data_dir_for(cfg, task.name), reader=f"raytune-ft: test evaluation of {export_dir}")
        texts, labels = table.column("text").to_pylist(), table.column("label_id").to_pylist()
        preds = [
            p["label_id"]
            for start in range(0, len(texts), BATCH)
            for p in model.classify(texts[start : start + BATCH], task.name)
        ]
        scored = standard_metrics(preds, labels, model.task_labels[task.name])
        out[f"test_{task.name}_accuracy"] = scored["accuracy"]
        out[f"test_{task.name}_f1_macro"] = scored["f1_macro"]
        out[f"test_{task.name}_rows"] = scored["rows"]
    return out
