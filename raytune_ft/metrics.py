"""Evaluation metrics built from counts, so that per-worker results add up exactly across workers.

Each worker accumulates a loss sum, a token/row count and a confusion matrix over its slice of the data; these
are all sums, so one all-reduce of them gives the same numbers as scoring the whole set on one worker. Ratios
(accuracy, F1, perplexity) are only formed after the reduction. Pure torch: no scikit-learn at run time.

Generated answers of chat models are scored per row (answer_scores: exact, contains, token F1 as SQuAD computes
them); their means are sums over rows divided by the row count, so they add up across workers too.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from typing import Any

import torch

# math.exp overflows just past 709.78; a model that bad has no meaningful perplexity anyway.
_MAX_LOG_PERPLEXITY = 700.0


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 [num_classes, num_classes] counts, rows = true class, columns = predicted class."""
    preds, labels = preds.reshape(-1).long(), labels.reshape(-1).long()
    if preds.shape != labels.shape:
        raise ValueError(f"{preds.numel()} predictions for {labels.numel()} labels")
    # An out-of-range id would silently land in another cell of the flattened bincount.
    for name, ids in (("prediction", preds), ("label", labels)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
            raise ValueError(f"{name} ids must be in [0, {num_classes}), got {int(ids.min())}..{int(ids.max())}")
    cells = torch.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return cells.reshape(num_classes, num_classes)


def _per_class(confusion: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Precision, recall, F1, support and predicted count per class; a 0/0 ratio is 0 (sklearn zero_division=0)."""
    c = confusion.double()
    tp, support, predicted = c.diagonal(), c.sum(1), c.sum(0)

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    # 2tp / (2tp + fp + fn) equals 2PR / (P + R) where both are defined, and is 0 rather than NaN where not.
    return ratio(tp, predicted), ratio(tp, support), ratio(2 * tp, support + predicted), support, predicted


def classification_metrics(confusion: torch.Tensor, class_names: list[str]) -> dict[str, float]:
    """Accuracy, macro-F1 over all classes, and per-class precision/recall/F1/support under flat keys."""
    k = confusion.shape[0]
    if confusion.shape != (k, k) or len(class_names) != k:
        raise ValueError(f"confusion of shape {tuple(confusion.shape)} does not fit {len(class_names)} class names")
    if len(set(class_names)) != k:
        raise ValueError(f"class names must be distinct, got {class_names}")
    precision, recall, f1, support, _ = _per_class(confusion)
    total = float(support.sum())
    metrics = {
        "accuracy": float(confusion.diagonal().sum()) / total if total else 0.0,
        # Classes absent from this split still count (as 0), so the number is comparable across splits and runs.
        "f1_macro": float(f1.mean()) if k else 0.0,
    }
    for i, name in enumerate(class_names):
        metrics[f"precision/{name}"] = float(precision[i])
        metrics[f"recall/{name}"] = float(recall[i])
        metrics[f"f1/{name}"] = float(f1[i])
        metrics[f"support/{name}"] = float(support[i])
    return metrics


def perplexity(mean_loss: float) -> float:
    """exp of the mean per-token loss, or inf where that would overflow a float."""
    return math.exp(mean_loss) if mean_loss <= _MAX_LOG_PERPLEXITY else float("inf")


def whole_metrics(preds: list[int], labels: list[int], whole: list[bool], class_names: list[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 on the rows no other row contains (data/overlap.py: for SST-2 the whole sentences, the
    input a deployed model meets), under `whole_`, with their count; empty when there are none."""
    rows = [i for i, is_whole in enumerate(whole) if is_whole]
    if not rows:
        return {}
    confusion = confusion_matrix(
        torch.tensor([preds[i] for i in rows]), torch.tensor([labels[i] for i in rows]), len(class_names)
    )
    found = classification_metrics(confusion, class_names)
    return {"whole_accuracy": found["accuracy"], "whole_f1_macro": found["f1_macro"], "whole_rows": len(rows)}


def slice_metrics(preds: list[int], labels: list[int], slices: list[str], class_names: list[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 per value of a column (language, source, ...), to show which group the model fails.

    Unlike `classification_metrics`, a slice's macro-F1 averages only the classes that occur in that slice's labels
    or predictions (sklearn's default labels=None): a small slice that lacks a class would otherwise look bad for
    a class it never had a chance to get right, and become the "worst slice" for no reason.
    """
    if not len(preds) == len(labels) == len(slices):
        raise ValueError(f"{len(preds)} predictions, {len(labels)} labels and {len(slices)} slice values")
    if not slices:
        raise ValueError("no rows to slice")
    rows: dict[str, list[int]] = {}
    for i, value in enumerate(slices):
        rows.setdefault(value, []).append(i)
    k = len(class_names)
    per_slice: dict[str, dict[str, float]] = {}
    for value in sorted(rows):
        idx = rows[value]
        confusion = confusion_matrix(torch.tensor([preds[i] for i in idx]), torch.tensor([labels[i] for i in idx]), k)
        _, _, f1, support, predicted = _per_class(confusion)
        present = (support + predicted) > 0
        per_slice[value] = {
            "rows": len(idx),
            "accuracy": float(confusion.diagonal().sum()) / len(idx),
            "f1_macro": float(f1[present].mean()),
        }
    # Ties go to the first value in sorted order, so the report does not change between runs.
    worst = min(per_slice, key=lambda v: per_slice[v]["f1_macro"])
    best = max(per_slice, key=lambda v: per_slice[v]["f1_macro"])
    return {
        "slices": per_slice,
        "worst_slice": worst,
        "best_slice": best,
        "f1_macro_gap": per_slice[best]["f1_macro"] - per_slice[worst]["f1_macro"],
    }


def pack_counts(loss_sum: float, n: int, confusion: torch.Tensor | None) -> torch.Tensor:
    """[loss_sum, n, *confusion.flatten()] as one float64 tensor, so evaluation needs a single all-reduce.

    float64 holds integers exactly up to 2**53, far beyond any count an evaluation set produces.
    """
    device = confusion.device if confusion is not None else None
    head = torch.tensor([float(loss_sum), float(n)], dtype=torch.float64, device=device)
    if confusion is None:
        return head
    return torch.cat([head, confusion.reshape(-1).to(torch.float64)])


def unpack_counts(t: torch.Tensor, num_classes: int | None) -> tuple[float, int, torch.Tensor | None]:
    """Inverse of `pack_counts`: (loss_sum, n, int64 confusion or None when num_classes is None)."""
    expected = 2 + (num_classes * num_classes if num_classes is not None else 0)
    if t.dim() != 1 or t.numel() != expected:
        raise ValueError(f"packed counts of shape {tuple(t.shape)}, expected ({expected},) for {num_classes} classes")
    t = t.detach().cpu()
    loss_sum, n = float(t[0]), int(round(float(t[1])))
    if num_classes is None:
        return loss_sum, n, None
    return loss_sum, n, t[2:].round().long().reshape(num_classes, num_classes)


# ------------------------------------------------------------------------------------------- generated answers

ANSWER_METRICS = ("exact", "contains", "token_f1")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower-case, punctuation dropped (ASCII and Unicode punctuation), the articles
    a/an/the dropped, whitespace collapsed; so "The Paris." and "paris" compare equal."""
    text = "".join(
        ch for ch in text.lower() if ch not in string.punctuation and not unicodedata.category(ch).startswith("P")
    )
    return " ".join(_ARTICLES.sub(" ", text).split())


def _contains_words(answer: list[str], reference: list[str]) -> bool:
    """REFERENCE as a run of whole words inside ANSWER: as words, not characters, so that a reference "4" is not
    found in "14" nor "cat" in "concatenate"."""
    n = len(reference)
    return any(answer[i : i + n] == reference for i in range(len(answer) - n + 1))


def _token_f1(answer: list[str], reference: list[str]) -> float:
    """SQuAD's F1 of the two bags of words; when either is empty, 1.0 if both are, else 0.0."""
    if not answer or not reference:
        return float(answer == reference)
    common = sum((Counter(answer) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(answer), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def answer_scores(answers: list[str], references: list[str]) -> list[dict[str, float]]:
    """Per row, each generated answer against its reference, both normalised (normalize_answer): `exact` (equal),
    `contains` (the reference's words appear consecutively in the answer; an empty reference is contained in any
    answer), `token_f1` (SQuAD's word-overlap F1). Each is 0.0 or 1.0 except token_f1."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    rows = []
    for answer, reference in zip(answers, references, strict=True):
        got, want = normalize_answer(answer).split(), normalize_answer(reference).split()
        rows.append(
            {
                "exact": float(got == want),
                "contains": float(_contains_words(got, want)),
                "token_f1": _token_f1(got, want),
            }
        )
    return rows


def mean_answer_scores(rows: list[dict[str, float]], metrics: list[str]) -> dict[str, float]:
    """The mean of each of METRICS over ROWS (answer_scores' rows); {} when there are no rows."""
    if not rows:
        return {}
    return {name: sum(row[name] for row in rows) / len(rows) for name in metrics}
