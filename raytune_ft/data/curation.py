"""Curation steps. Each is optional, returns the kept records and a StepReport with what it removed."""

from __future__ import annotations

import random
import re
import string
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raytune_ft.config.schema import NormalizeConfig
from raytune_ft.data.readers import Records

MAX_EXAMPLES = 5
_PUNCTUATION = str.maketrans("", "", string.punctuation + "“”‘’«»…–—")


@dataclass
class StepReport:
    name: str
    rows_in: int
    rows_out: int
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "removed": self.rows_in - self.rows_out,
            **self.details,
        }


def normalizer(cfg: NormalizeConfig) -> Callable[[str], str]:
    """Key under which two texts count as the same (NFKC always; case, whitespace, punctuation as configured)."""

    def normalize(text: str) -> str:
        text = unicodedata.normalize("NFKC", text)
        if cfg.lowercase:
            text = text.casefold()
        if cfg.strip_punctuation:
            text = text.translate(_PUNCTUATION)
        if cfg.collapse_whitespace:
            text = " ".join(text.split())
        return text

    return normalize


def exact(text: str) -> str:
    return text


def repeat_findings(records: Records, key: Callable[[str], str]) -> dict[str, Any]:
    """What repeats, before anything is removed: rows that repeat an earlier one, and how many disagree on label."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(records.texts):
        groups[key(text)].append(i)
    repeated = [g for g in groups.values() if len(g) > 1]
    found: dict[str, Any] = {
        "repeated_rows": sum(len(g) - 1 for g in repeated),
        "texts_repeated": len(repeated),
    }
    if records.labels is not None:
        labels = records.labels
        conflicting = [g for g in repeated if len({labels[i] for i in g}) > 1]
        found["repeats_with_conflicting_label"] = sum(1 for g in repeated for i in g[1:] if labels[i] != labels[g[0]])
        found["texts_with_conflicting_labels"] = len(conflicting)
        found["rows_in_conflicting_texts"] = sum(len(g) for g in conflicting)
        found["conflict_examples"] = [_example(records, g) for g in conflicting[:MAX_EXAMPLES]]
    found["repeat_examples"] = [_example(records, g) for g in repeated[:MAX_EXAMPLES]]
    return found


def _example(records: Records, group: list[int]) -> dict[str, Any]:
    example: dict[str, Any] = {"text": records.texts[group[0]], "lines": [records.rows[i] for i in group]}
    if records.labels is not None:
        example["labels"] = [records.labels[i] for i in group]
    return example


def drop_empty(records: Records) -> tuple[Records, StepReport]:
    keep = [i for i, text in enumerate(records.texts) if text.strip()]
    return records.take(keep), StepReport("drop_empty", len(records), len(keep))


def length_filter(records: Records, min_chars: int, max_chars: int | None) -> tuple[Records, StepReport]:
    too_short = too_long = 0
    keep = []
    for i, text in enumerate(records.texts):
        n = len(text.strip())
        if n < min_chars:
            too_short += 1
        elif max_chars is not None and n > max_chars:
            too_long += 1
        else:
            keep.append(i)
    details = {"min_chars": min_chars, "max_chars": max_chars, "too_short": too_short, "too_long": too_long}
    return records.take(keep), StepReport("length_filter", len(records), len(keep), details)


def resolve_conflicts(records: Records, key: Callable[[str], str], mode: str) -> tuple[Records, StepReport]:
    """Texts seen with different labels: 'drop' removes every copy, 'majority' keeps the copies of the most
    common label (a tie is dropped)."""
    assert records.labels is not None
    groups: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(records.texts):
        groups[key(text)].append(i)
    removed: set[int] = set()
    conflicting = 0
    for members in groups.values():
        counts = Counter(records.labels[i] for i in members)
        if len(counts) < 2:
            continue
        conflicting += 1
        (top, n_top), (_, n_second) = counts.most_common(2)
        if mode == "majority" and n_top > n_second:
            removed.update(i for i in members if records.labels[i] != top)
        else:
            removed.update(members)
    keep = [i for i in range(len(records)) if i not in removed]
    details = {"mode": mode, "conflicting_texts": conflicting}
    return records.take(keep), StepReport(f"conflicts_{mode}", len(records), len(keep), details)


def dedupe(records: Records, key: Callable[[str], str], name: str) -> tuple[Records, StepReport]:
    """Keep the first row of each key; later rows with the same key are removed."""
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(records.texts):
        k = key(text)
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return records.take(keep), StepReport(name, len(records), len(keep))


def downsample(records: Records, seed: int) -> tuple[Records, StepReport]:
    """Randomly drop rows of larger classes down to the smallest class (training split only)."""
    assert records.labels is not None
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(records.labels):
        by_class[label].append(i)
    target = min(len(v) for v in by_class.values())
    rng = random.Random(seed)
    keep: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        keep += members if len(members) == target else rng.sample(members, target)
    keep.sort()
    return records.take(keep), StepReport("balance_downsample", len(records), len(keep), {"per_class": target})


def class_weights(labels: list[str], classes: list[str]) -> dict[str, float]:
    """Inverse-frequency weights n / (k * n_c), so a balanced set gets 1.0 for every class."""
    counts = Counter(labels)
    n, k = len(labels), len(classes)
    return {c: round(n / (k * counts[c]), 6) if counts[c] else 0.0 for c in classes}


def class_balance(labels: list[str] | None, classes: list[str] | None) -> dict[str, Any] | None:
    if labels is None or classes is None:
        return None
    counts = Counter(labels)
    n = max(len(labels), 1)
    return {c: {"rows": counts[c], "fraction": round(counts[c] / n, 4)} for c in classes}


_INT = re.compile(r"^-?\d+$")


def infer_classes(labels: list[str]) -> list[str]:
    distinct = set(labels)
    if all(_INT.match(label) for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)
