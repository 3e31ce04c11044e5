"""Deterministic train/validation/test split from one seed.

Rows are split by normalised-text group, so a text and its near-copies always land in the same split even
when de-duplication is off: no normalised text is in two splits.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable

from raytune_ft.config.schema import SplitConfig
from raytune_ft.data.readers import DataError, Records

SPLITS = ("train", "validation", "test")


def resolve_strategy(cfg: SplitConfig, has_labels: bool) -> str:
    if cfg.strategy != "auto":
        return cfg.strategy
    # Causal-LM corpora are split into contiguous regions so neighbouring passages do not leak into the test.
    return "stratified" if has_labels else "contiguous"


def split_records(
    records: Records, cfg: SplitConfig, key: Callable[[str], str], source: str
) -> tuple[dict[str, Records], str]:
    strategy = resolve_strategy(cfg, records.labels is not None)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(records.texts):
        groups[key(text)].append(i)
    ordered = sorted(groups.values(), key=lambda g: g[0])

    if strategy == "stratified":
        if records.labels is None:
            raise DataError(source, None, "stratified split needs labels")
        strata: dict[str, list[list[int]]] = defaultdict(list)
        for group in ordered:
            strata[records.labels[group[0]]].append(group)
        assignment: dict[str, list[list[int]]] = {name: [] for name in SPLITS}
        rng = random.Random(cfg.seed)
        for label in sorted(strata):
            part = _cut(_shuffled(strata[label], rng), cfg)
            for name in SPLITS:
                assignment[name] += part[name]
    elif strategy == "random":
        assignment = _cut(_shuffled(ordered, random.Random(cfg.seed)), cfg)
    else:
        n = len(ordered)
        n_test, n_val = round(n * cfg.test), round(n * cfg.validation)
        assignment = {
            "train": ordered[: n - n_test - n_val],
            "validation": ordered[n - n_test - n_val : n - n_test],
            "test": ordered[n - n_test :],
        }
    splits = {name: records.take(sorted(i for g in groups_ for i in g)) for name, groups_ in assignment.items()}
    return splits, strategy


def _shuffled(groups: list[list[int]], rng: random.Random) -> list[list[int]]:
    groups = list(groups)
    rng.shuffle(groups)
    return groups


def _cut(groups: list[list[int]], cfg: SplitConfig) -> dict[str, list[list[int]]]:
    n = len(groups)
    n_test, n_val = round(n * cfg.test), round(n * cfg.validation)
    return {"test": groups[:n_test], "validation": groups[n_test : n_test + n_val], "train": groups[n_test + n_val :]}


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
