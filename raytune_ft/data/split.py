"""Deterministic train/validation/test split from one seed.

Rows are split by group (data/overlap.py): rows with the same normalised text, and, with data.split.overlap, texts
that contain or nearly repeat one another, always land in the same split, even when de-duplication is off.
Common phrases, which overlap too many texts to group, stay in the training split. Sizes are counted in rows.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter, defaultdict
from collections.abc import Callable

from raytune_ft.config.schema import SplitConfig
from raytune_ft.data import overlap
from raytune_ft.data.readers import DataError, Records

SPLITS = ("train", "validation", "test")


def resolve_strategy(cfg: SplitConfig, has_labels: bool) -> str:
    if cfg.strategy != "auto":
        return cfg.strategy
    # Causal-LM corpora are split into contiguous regions so neighbouring passages do not leak into the test.
    return "stratified" if has_labels else "contiguous"


def split_records(
    records: Records, cfg: SplitConfig, key: Callable[[str], str], source: str
) -> tuple[dict[str, Records], str, overlap.Grouping]:
    """The three splits (each row marked whole or not when containment is on), the strategy used, the grouping."""
    strategy = resolve_strategy(cfg, records.labels is not None)
    settings = overlap.resolve(cfg.overlap, causal_lm=records.labels is None)
    grouping = overlap.group_rows(records.texts, key, settings)
    ordered = grouping.groups

    if strategy == "stratified":
        if records.labels is None:
            raise DataError(source, None, "stratified split needs labels")
        labels = records.labels
        strata: dict[str, list[list[int]]] = defaultdict(list)
        for group in ordered:
            # a merged group (a sentence and its phrases) can mix labels: it counts under its most common one
            strata[Counter(labels[i] for i in group).most_common(1)[0][0]].append(group)
        assignment: dict[str, list[list[int]]] = {name: [] for name in SPLITS}
        rng = random.Random(cfg.seed)
        for label in sorted(strata):
            part = _cut(_shuffled(strata[label], rng), cfg)
            for name in SPLITS:
                assignment[name] += part[name]
    elif strategy == "random":
        assignment = _cut(_shuffled(ordered, random.Random(cfg.seed)), cfg)
    else:
        # held-out text at the end of the corpus: the cut runs from the last group backwards
        cut = _cut(ordered[::-1], cfg)
        assignment = {name: groups[::-1] for name, groups in cut.items()}
    assignment["train"] = [*assignment["train"], grouping.common]
    marked = dataclasses.replace(records, whole=grouping.whole)
    splits = {name: marked.take(sorted(i for g in groups_ for i in g)) for name, groups_ in assignment.items()}
    return splits, strategy, grouping


def _shuffled(groups: list[list[int]], rng: random.Random) -> list[list[int]]:
    groups = list(groups)
    rng.shuffle(groups)
    return groups


def _cut(groups: list[list[int]], cfg: SplitConfig) -> dict[str, list[list[int]]]:
    """Whole groups in GROUPS' order: to test until it holds its share of the rows, then to validation, the rest to
    train. A group larger than a split's whole share skips that split (so one group can leave a split at most one
    group over its share, and cannot swallow the training data)."""
    n = sum(len(g) for g in groups)
    targets = {"test": round(n * cfg.test), "validation": round(n * cfg.validation)}
    out: dict[str, list[list[int]]] = {name: [] for name in SPLITS}
    rows = dict.fromkeys(targets, 0)
    for group in groups:
        for name in ("test", "validation"):
            if rows[name] < targets[name] and len(group) <= targets[name]:
                out[name].append(group)
                rows[name] += len(group)
                break
        else:
            out["train"].append(group)
    return out


def check_disjoint(splits: dict[str, Records], key: Callable[[str], str]) -> None:
    """Verify, not assume: a normalised text found in two splits is a bug that would inflate test scores."""
    owner: dict[str, str] = {}
    for name, records in splits.items():
        for text in records.texts:
            k = key(text)
            if owner.setdefault(k, name) != name:
                raise AssertionError(f"text {text!r} is in both {owner[k]} and {name}")


def check_classes_present(splits: dict[str, Records], classes: list[str], cfg: SplitConfig, source: str) -> None:
    wanted = {"train": True, "validation": cfg.validation > 0, "test": cfg.test > 0}
    for name, records in splits.items():
        if not wanted[name]:
            continue
        if len(records) == 0:
            raise DataError(source, None, f"the {name} split is empty; the data set is too small for this split")
        if records.labels is None:
            continue
        missing = sorted(set(classes) - set(records.labels))
        if missing:
            raise DataError(
                source,
                None,
                f"the {name} split has no rows of class {', '.join(map(repr, missing))}: too few examples of it "
                f"after curation; add data or change data.split",
            )
