"""What `raytune-ft eval` computes from predictions: calibration, slices, edge cases, the most confident mistakes.

Pure functions over plain lists (probabilities per row, label ids, texts), so that each has a fixture whose right
answer is known; the model is run elsewhere (evaluation.runner).
"""

from __future__ import annotations

from typing import Any

import torch

from raytune_ft.metrics import classification_metrics, confusion_matrix, slice_metrics

# word counts that split short reviews from long documents; a bucket's name says its range
LENGTH_BUCKETS = ((1, 5), (6, 20), (21, 50), (51, None))


def calibration(probs: list[list[float]], labels: list[int], bins: int = 10) -> dict[str, Any]:
    """Expected and maximum calibration error over equal-width confidence bins, and each bin's
    confidence and accuracy (the reliability diagram). Confidence is the predicted class's probability."""
    if len(probs) != len(labels) or not labels:
        raise ValueError(f"{len(probs)} probability rows for {len(labels)} labels")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    table: list[dict[str, Any]] = [
        {"low": i / bins, "high": (i + 1) / bins, "rows": 0, "confidence": 0.0, "accuracy": 0.0} for i in range(bins)
    ]
    for row, label in zip(probs, labels, strict=True):
        pred = max(range(len(row)), key=row.__getitem__)
        confidence = row[pred]
        # a confidence of exactly 1.0 belongs to the top bin, not one past it
        b = table[min(int(confidence * bins), bins - 1)]
        b["rows"] += 1
        b["confidence"] += confidence
        b["accuracy"] += float(pred == label)
    n = len(labels)
    ece = mce = 0.0
    for b in table:
        if b["rows"]:
            b["confidence"] /= b["rows"]
            b["accuracy"] /= b["rows"]
            gap = abs(b["accuracy"] - b["confidence"])
            ece += b["rows"] / n * gap
            mce = max(mce, gap)
    return {"ece": ece, "mce": mce, "bins": table, "rows": n}


def length_bucket(text: str) -> str:
    words = len(text.split())
    for low, high in LENGTH_BUCKETS:
        if high is None or words <= high:
            return f"{low}+ words" if high is None else f"{low}-{high} words"
    raise AssertionError("the last bucket is open-ended")


def standard_metrics(preds: list[int], labels: list[int], names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    confusion = confusion_matrix(torch.tensor(preds), torch.tensor(labels), len(names))
    flat = classification_metrics(confusion, names)
    per_class = {name: {k: flat[f"{k}/{name}"] for k in ("precision", "recall", "f1", "support")} for name in names}
    return {
        "rows": len(labels),
        "accuracy": flat["accuracy"],
        "f1_macro": flat["f1_macro"],
        "per_class": per_class,
        "confusion_matrix": {"labels": names, "counts": confusion.tolist()},
    }


def slices_by(columns: dict[str, list[str]], preds: list[int], labels: list[int], names: list[str]) -> dict:
    """Per column: accuracy and macro-F1 for each of its values, the best and worst value and the gap between."""
    return {column: slice_metrics(preds, labels, values, names) for column, values in columns.items()}


def confident_mistakes(
    texts: list[str], labels: list[int], probs: list[list[float]], names: list[str], k: int
) -> list[dict[str, Any]]:
    """The K wrong predictions the model was most sure of, with their texts: where error analysis starts."""
    wrong = []
    for i, (row, label) in enumerate(zip(probs, labels, strict=True)):
        pred = max(range(len(row)), key=row.__getitem__)
        if pred != label:
            wrong.append((row[pred], i, pred))
    wrong.sort(key=lambda w: (-w[0], w[1]))
    return [
        {"row": i, "text": texts[i], "label": names[labels[i]], "predicted": names[pred], "confidence": conf}
        for conf, i, pred in wrong[:k]
    ]


def edge_case_results(texts: list[str], expected: list[str], got: list[str], kinds: list[str] | None) -> dict[str, Any]:
    """Pass rate overall and per kind (negation, sarcasm, typos...), with every failure listed."""
    kinds = kinds or ["all"] * len(texts)
    per_kind: dict[str, dict[str, int]] = {}
    failures = []
    for i, (text, want, answer, kind) in enumerate(zip(texts, expected, got, kinds, strict=True)):
        tally = per_kind.setdefault(kind, {"cases": 0, "passed": 0})
        tally["cases"] += 1
        if answer == want:
            tally["passed"] += 1
        else:
            failures.append({"row": i, "kind": kind, "text": text, "expected": want, "got": answer})
    for tally in per_kind.values():
        tally["pass_rate"] = tally["passed"] / tally["cases"]
    passed = sum(t["passed"] for t in per_kind.values())
    return {
        "cases": len(texts),
        "passed": passed,
        "pass_rate": passed / len(texts) if texts else 0.0,
        "by_kind": dict(sorted(per_kind.items())),
        "failures": failures,
    }


def forgetting(before: float | None, after: float, metric: str) -> dict[str, Any]:
    """The retain-set metric before and after fine-tuning, and how much worse it got (positive = forgot).

    For perplexity (lower is better) the change is after/before - 1; for accuracy (higher is better) before - after."""
    out: dict[str, Any] = {"metric": metric, "before": before, "after": after, "worse_by": None}
    if before is not None:
        out["worse_by"] = after / before - 1.0 if metric == "perplexity" else before - after
    return out
