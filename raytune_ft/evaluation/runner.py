"""`raytune-ft eval EXPORT DATA`: an exported model judged the way it will be used, in one process, no Ray.

Classification: accuracy, macro-F1, per-class precision/recall, confusion matrix, calibration (ECE and a
reliability diagram), metrics per slice (any column, and text length), the most confident mistakes, a file of
hard cases reported apart, forgetting on a retain set, and latency at batch 1 and batched.
Causal LM: perplexity on DATA, forgetting as perplexity on general text before (the base model) and after,
edge cases as prompts whose greedy completion must contain the expected text, and latency per completion.
Chat: each conversation's last answer generated greedily from the turns before it and scored against the
reference (exact, contains, token F1; per slice and prompt length), the loss and perplexity on the answer tokens,
the first and the worst examples, edge cases as questions whose answer must contain the expected text, and latency
per answer (evaluation/chat.py).

Everything goes to OUT/eval.json (plus reliability.png and eval.md); the export's model card picks it up.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raytune_ft.data.readers import DataError, Records, read_records
from raytune_ft.evaluation import scoring
from raytune_ft.layout import EVAL_DIR, EVAL_FILE, EVAL_SUMMARY, RELIABILITY
from raytune_ft.metrics import perplexity
from raytune_ft.modelcard import evaluation_markdown, write_model_card


@dataclass
class EvalRequest:
    data: Path
    text_column: str | None = None  # default: the column the export was trained on
    label_column: str | None = None
    slice_columns: list[str] = field(default_factory=list)
    edge_cases: Path | None = None
    retain: Path | None = None
    reference: str | None = None  # the model before fine-tuning; default: the base model (causal LM)
    bins: int = 10
    top_mistakes: int = 10
    latency_requests: int = 50
    batch_size: int = 32
    max_rows: int | None = None
    task: str | None = None  # an extra classification task of a multi-task export (default: its own task)
    max_new_tokens: int | None = None  # chat: tokens per answer at most (default: the export's train.generation)


def evaluate_export(export: Path, request: EvalRequest, out_dir: Path | None = None) -> dict[str, Any]:
    """Evaluate EXPORT as REQUEST says; the report (also written to OUT_DIR, default EXPORT/eval/<data stem>)."""
    from raytune_ft.serve.model import LoadedModel

    model = LoadedModel(export)
    experiment = model.meta.get("experiment", {})
    columns = experiment.get("data", {}).get("columns", {})
    task = request.task if request.task != model.primary_task else None
    if task is not None:
        if task not in model.heads:
            known = ", ".join(model.heads) or "none: a single-task export"
            raise ValueError(f"--task: '{task}' is not a classification task of this export ({known})")
        spec = next(t for t in experiment.get("tasks", []) if t["name"] == task)
        columns = spec["data"].get("columns", {})
    text_column = request.text_column or columns.get("text", "text")
    started = time.time()
    if model.task == "chat" and task is None:
        report, texts = _evaluate_chat(model, request, experiment)
    elif model.task == "causal-lm" and task is None:
        report = _evaluate_lm(model, request, text_column, experiment)
    else:
        label_column = request.label_column or columns.get("label", "label")
        report = _evaluate_classifier(model, request, text_column, label_column, task)
    if task is None:
        if model.task != "chat":
            texts = _read(request.data, text_column, None, limit=request.max_rows).texts
        report["overlap_with_training"] = overlap_with_training(experiment, texts)
    report.update(
        export=str(model.export_dir),
        task=model.task if task is None else "sequence-classification",
        task_name=task or model.primary_task,
        data=str(request.data),
        evaluated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        seconds=round(time.time() - started, 2),
    )
    out_dir = out_dir or model.export_dir / EVAL_DIR / (f"{task}-{request.data.stem}" if task else request.data.stem)
    write_report(report, out_dir)
    if out_dir.resolve().parent.parent == model.export_dir.resolve():
        write_model_card(model.export_dir)
    return report


def overlap_with_training(experiment: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """How many of TEXTS overlap the export's training split, measured as the data report measures validation and
    test (data.split.overlap's settings): a score on rows the model trained on in part is not a score on new text.
    The training split is read from the experiment's data directory; an export moved away from it says so."""
    from pydantic import ValidationError

    from raytune_ft.config.schema import ExperimentConfig
    from raytune_ft.data import data_dir_for, load_split, overlap
    from raytune_ft.data.curation import normalizer

    try:
        cfg = ExperimentConfig.model_validate(experiment)
    except ValidationError as exc:
        return {"measured": False, "reason": f"the export's experiment is not complete ({exc.error_count()} errors)"}
    train = data_dir_for(cfg) / "train.parquet"
    if not train.is_file():
        return {"measured": False, "reason": f"the export's training split is not at {train}"}
    table = load_split(train.parent, "train")
    if "text" not in table.column_names:
        return {"measured": False, "reason": f"the export's training split {train} has no text column"}
    train_texts = table.column("text").to_pylist()
    settings = overlap.resolve(cfg.data.split.overlap, causal_lm=cfg.model.task == "causal-lm")
    found = overlap.leakage(train_texts, texts, normalizer(cfg.data.curation.normalize), settings)
    return {"measured": True, "training_split": str(train), **found}


def _label_ids(labels: list[str], rows: list[int], names: list[str], classes: list[str], path: Path) -> list[int]:
    """Each label as the class index the model predicts: given as the class value (0/1) or its name (positive)."""
    index = {str(c): i for i, c in enumerate(classes)} | {str(n): i for i, n in enumerate(names)}
    ids = []
    for label, row in zip(labels, rows, strict=True):
        if label not in index:
            raise DataError(path, row, f"label '{label}' is not one the model knows ({', '.join(names)})")
        ids.append(index[label])
    return ids


def _read(
    path: Path, text_column: str, label_column: str | None, slice_column: str | None = None, limit: int | None = None
) -> Records:
    records = read_records(path, "auto", text_column, label_column, slice_column)
    return records.take(list(range(min(len(records), limit)))) if limit else records


def _optional_column(path: Path, text_column: str, label_column: str, column: str) -> list[str] | None:
    try:
        return _read(path, text_column, label_column, column).slices
    except DataError as exc:
        if f"'{column}'" in str(exc):
            return None
        raise


def _probabilities(model: Any, texts: list[str], batch_size: int, task: str | None = None) -> list[list[float]]:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
    probs: list[list[float]] = [[] for _ in texts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        for row, answer in zip(rows, model.classify([texts[i] for i in rows], task), strict=True):
            probs[row] = list(answer["probs"].values())  # in label-id order
    return probs


def _evaluate_classifier(
    model: Any, request: EvalRequest, text_column: str, label_column: str, task: str | None = None
) -> dict[str, Any]:
    records = _read(request.data, text_column, label_column, limit=request.max_rows)
    if task is None:
        names = model.labels
        classes = [str(c) for c in (model.meta.get("classes") or names)]
    else:
        names = model.task_labels[task]
        spec = next(t for t in model.meta.get("tasks", []) if t["name"] == task)
        classes = [str(c) for c in (spec.get("classes") or names)]
    labels = _label_ids(records.labels or [], records.rows, names, classes, request.data)
    probs = _probabilities(model, records.texts, request.batch_size, task)
    preds = [max(range(len(p)), key=p.__getitem__) for p in probs]
    report: dict[str, Any] = {"metrics": scoring.standard_metrics(preds, labels, names)}
    report["calibration"] = scoring.calibration(probs, labels, request.bins)
    slices = {"length": [scoring.length_bucket(t) for t in records.texts]}
    for column in request.slice_columns:
        values = _read(request.data, text_column, label_column, column, limit=request.max_rows).slices
        slices[column] = list(values or [])
    report["slices"] = scoring.slices_by(slices, preds, labels, names)
    report["confident_mistakes"] = scoring.confident_mistakes(records.texts, labels, probs, names, request.top_mistakes)
    if request.edge_cases is not None:
        cases = _read(request.edge_cases, "text", "expected")
        kinds = _optional_column(request.edge_cases, "text", "expected", "kind")
        expected_ids = _label_ids(cases.labels or [], cases.rows, names, classes, request.edge_cases)
        got = [names[max(range(len(p)), key=p.__getitem__)] for p in _probabilities(model, cases.texts, 32, task)]
        report["edge_cases"] = scoring.edge_case_results(cases.texts, [names[i] for i in expected_ids], got, kinds) | {
            "file": str(request.edge_cases)
        }
    if request.retain is not None:
        report["forgetting"] = _classifier_forgetting(model, request, text_column, label_column, names, classes, task)
    report["latency"] = _latency(lambda batch: model.classify(batch, task), records.texts, request)
    return report


def _classifier_forgetting(
    model: Any,
    request: EvalRequest,
    text_column: str,
    label_column: str,
    names: list[str],
    classes: list[str],
    task: str | None = None,
) -> dict[str, Any]:
    """Accuracy on a labelled retain set (an earlier task with the same labels), after and, given the model
    before this fine-tuning (--reference, an export), before. A base encoder has no trained head to compare."""
    from raytune_ft.serve.model import LoadedModel

    retain = _read(request.retain, text_column, label_column, limit=request.max_rows)
    labels = _label_ids(retain.labels or [], retain.rows, names, classes, request.retain)

    def accuracy(m: Any) -> float:
        probs = _probabilities(m, retain.texts, request.batch_size, task)
        return sum(max(range(len(p)), key=p.__getitem__) == y for p, y in zip(probs, labels, strict=True)) / len(labels)

    before = accuracy(LoadedModel(Path(request.reference))) if request.reference else None
    return scoring.forgetting(before, accuracy(model), "accuracy") | {
        "file": str(request.retain),
        "reference": request.reference,
        "rows": len(labels),
    }


@torch.inference_mode()
def lm_perplexity(net: Any, tokenizer: Any, texts: list[str], block_size: int, batch_size: int = 8) -> dict:
    """Perplexity over TEXTS packed into blocks of BLOCK_SIZE tokens, as training and the test split count it."""
    from raytune_ft.data.tokenize import tokenize_causal_blocks
    from raytune_ft.train.evaluate import next_token_loss

    blocks = tokenize_causal_blocks(texts, tokenizer, block_size)["input_ids"]
    if not blocks:
        raise ValueError(f"the text holds fewer than one block of {block_size} tokens")
    device = next(net.parameters()).device
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[start : start + batch_size], device=device)
        logits = net(input_ids=ids).logits
        loss, n = next_token_loss(logits, ids, torch.ones_like(ids), "sum")
        loss_sum, tokens = loss_sum + float(loss), tokens + n
    return {"perplexity": perplexity(loss_sum / tokens), "loss": loss_sum / tokens, "tokens": tokens}


def _lm_texts(path: Path, text_column: str, limit: int | None) -> list[str]:
    records = read_records(path, "auto", text_column, None)
    return records.texts[:limit] if limit else records.texts


def _evaluate_lm(model: Any, request: EvalRequest, text_column: str, experiment: dict) -> dict[str, Any]:
    block = int(experiment.get("data", {}).get("block_size") or 128)
    texts = _lm_texts(request.data, text_column, request.max_rows)
    scored = lm_perplexity(model.model, model.tokenizer, texts, block)
    report: dict[str, Any] = {"metrics": scored | {"rows": len(texts)}}
    if request.retain is not None:
        from transformers import AutoModelForCausalLM

        from raytune_ft.model_source import resolve_model_source

        retain = _lm_texts(request.retain, "text", request.max_rows)
        after = lm_perplexity(model.model, model.tokenizer, retain, block)["perplexity"]
        reference = request.reference or model.meta.get("provenance", {}).get("base_model")
        before = None
        if reference:
            base = AutoModelForCausalLM.from_pretrained(resolve_model_source(reference), dtype=torch.float32).eval()
            before = lm_perplexity(base, model.tokenizer, retain, block)["perplexity"]
        report["forgetting"] = scoring.forgetting(before, after, "perplexity") | {
            "file": str(request.retain),
            "reference": reference,
        }
    if request.edge_cases is not None:
        cases = _read(request.edge_cases, "text", "expected")
        kinds = _optional_column(request.edge_cases, "text", "expected", "kind")
        completions = [model.complete(t, 16, 0.0, 1.0, 0)["text"] for t in cases.texts]
        # a case passes when the greedy completion contains the expected text
        got = [want if want in c else c for want, c in zip(cases.labels or [], completions, strict=True)]
        report["edge_cases"] = scoring.edge_case_results(cases.texts, cases.labels or [], got, kinds) | {
            "file": str(request.edge_cases)
        }
    prompts = [t[:200] for t in texts]
    report["latency"] = _latency(lambda batch: [model.complete(p, 16, 0.0, 1.0, 0) for p in batch], prompts, request)
    report["latency"]["max_tokens"] = 16
    return report


def _evaluate_chat(model: Any, request: EvalRequest, experiment: dict) -> tuple[dict[str, Any], list[str]]:
    """The chat report (evaluation/chat.py's pieces), and each conversation's user turns joined: the text its
    overlap with the training split is measured on, as the split itself compared conversations."""
    from raytune_ft.data.chat import read_conversations, split_text
    from raytune_ft.evaluation import chat
    from raytune_ft.metrics import ANSWER_METRICS, answer_scores, mean_answer_scores

    data_cfg = experiment.get("data", {})
    conversations = read_conversations(request.data, "auto", chat.chat_columns(data_cfg.get("columns", {})))
    conversations = conversations.conversations[: request.max_rows] if request.max_rows else conversations.conversations
    cases = [chat.chat_case(c) for c in conversations]
    max_new = request.max_new_tokens or int(experiment.get("train", {}).get("generation", {}).get("max_new_tokens", 32))
    answers = _answers(model, [c.messages for c in cases], max_new, request.batch_size)
    scores = answer_scores(answers, [c.reference for c in cases])
    max_tokens = int((data_cfg.get("chat") or {}).get("max_tokens") or data_cfg.get("block_size") or 128)
    loss = chat.answer_loss(model.model, model.tokenizer, conversations, max_tokens)
    metrics = {"rows": len(cases), **mean_answer_scores(scores, list(ANSWER_METRICS)), **loss}
    report: dict[str, Any] = {"metrics": metrics, "generation": {"max_new_tokens": max_new, "decoding": "greedy"}}
    columns = {"length": chat.length_slices(cases)}
    for column in request.slice_columns:
        by_line = chat.slice_values(request.data, column)
        columns[column] = [by_line[c.line] for c in cases]
    report["slices"] = chat.score_slices(columns, scores)
    report["examples"] = chat.examples(cases, answers, scores, request.top_mistakes)
    if request.edge_cases is not None:
        edge = _read(request.edge_cases, "text", "expected")
        kinds = _optional_column(request.edge_cases, "text", "expected", "kind")
        wanted = edge.labels or []
        said = _answers(model, [[{"role": "user", "content": t}] for t in edge.texts], max_new, request.batch_size)
        # a case passes when the answer holds the expected text (as the `contains` score compares them)
        passed = [row["contains"] == 1.0 for row in answer_scores(said, wanted)]
        got = [want if ok else answer for want, ok, answer in zip(wanted, passed, said, strict=True)]
        report["edge_cases"] = scoring.edge_case_results(edge.texts, wanted, got, kinds) | {
            "file": str(request.edge_cases)
        }
    questions = [c.messages for c in cases]
    by_text = {json.dumps(m): m for m in questions}  # _latency passes texts around: messages as their JSON
    report["latency"] = _latency(
        lambda batch: model.answer([by_text[t] for t in batch], max_new, request.batch_size), list(by_text), request
    )
    report["latency"]["max_tokens"] = max_new
    return report, [split_text(c) for c in conversations]


def _answers(model: Any, conversations: list[list[dict[str, str]]], max_new: int, batch_size: int) -> list[str]:
    """model.answer over CONVERSATIONS sorted by length, so that batches pad little, given back in input order
    (an answer does not depend on which prompts share its batch: generation.greedy_answers pads on the left)."""
    order = sorted(range(len(conversations)), key=lambda i: sum(len(m["content"]) for m in conversations[i]))
    answers = model.answer([conversations[i] for i in order], max_new, batch_size)
    out = [""] * len(conversations)
    for i, answer in zip(order, answers, strict=True):
        out[i] = answer
    return out


def _latency(run: Any, texts: list[str], request: EvalRequest) -> dict[str, Any]:
    """In-process milliseconds per request at batch 1 (p50, p95) and rows per second in full batches."""
    sample = (texts * (1 + request.latency_requests // max(1, len(texts))))[: request.latency_requests]
    run(sample[:2])  # warm-up: first-call allocations are not the model's speed
    single = []
    for text in sample:
        began = time.perf_counter()
        run([text])
        single.append((time.perf_counter() - began) * 1000)
    single.sort()
    began = time.perf_counter()
    for start in range(0, len(sample), request.batch_size):
        run(sample[start : start + request.batch_size])
    batched_s = time.perf_counter() - began
    return {
        "requests": len(sample),
        "batch1_p50_ms": statistics.median(single),
        "batch1_p95_ms": single[min(len(single) - 1, int(0.95 * len(single)))],
        "batch_size": request.batch_size,
        "batched_rows_per_s": len(sample) / batched_s if batched_s else None,
        "threads": torch.get_num_threads(),
    }


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EVAL_FILE).write_text(json.dumps(report, indent=2, default=float) + "\n")
    if "calibration" in report:
        from raytune_ft.evaluation.figures import reliability_png

        (out_dir / RELIABILITY).write_bytes(reliability_png(report["calibration"]))
    (out_dir / EVAL_SUMMARY).write_text(evaluation_markdown(report))
