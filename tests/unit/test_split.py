"""Splits: deterministic per seed, disjoint after normalisation, stratified, contiguous for corpora."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from raytune_ft.config.schema import NormalizeConfig, SplitConfig
from raytune_ft.data.curation import normalizer
from raytune_ft.data.readers import DataError, Records
from raytune_ft.data.split import (
    SPLITS,
    check_classes_present,
    check_disjoint,
    resolve_strategy,
    split_records,
)

NORMALIZE = normalizer(NormalizeConfig())


def labelled(n_per_class: dict[str, int]) -> Records:
    texts, labels = [], []
    for label, n in n_per_class.items():
        for i in range(n):
            texts.append(f"review {i} of class {label}")
            labels.append(label)
    return Records(texts, labels, list(range(1, len(texts) + 1)))


def split(records: Records, **cfg) -> dict[str, Records]:
    splits, _, _ = split_records(records, SplitConfig(**cfg), NORMALIZE, "data.tsv")
    return splits


def assert_partition(records: Records, splits: dict[str, Records]) -> None:
    """Every row is in exactly one split."""
    rows = [row for name in SPLITS for row in splits[name].rows]
    assert sorted(rows) == sorted(records.rows)


# ---------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("strategy", ["stratified", "random"])
def test_same_seed_gives_identical_splits(strategy):
    recs = labelled({"0": 120, "1": 80})
    first, again = split(recs, seed=3, strategy=strategy), split(recs, seed=3, strategy=strategy)
    for name in SPLITS:
        assert first[name].texts == again[name].texts
        assert first[name].rows == again[name].rows
    assert_partition(recs, first)


@pytest.mark.parametrize("strategy", ["stratified", "random"])
def test_different_seed_gives_different_splits(strategy):
    recs = labelled({"0": 120, "1": 80})
    a, b = split(recs, seed=3, strategy=strategy), split(recs, seed=4, strategy=strategy)
    assert set(a["test"].texts) != set(b["test"].texts)
    assert set(a["validation"].texts) != set(b["validation"].texts)
    # ... but the sizes are the same
    assert {n: len(a[n]) for n in SPLITS} == {n: len(b[n]) for n in SPLITS}


def test_rows_in_each_split_keep_file_order():
    splits = split(labelled({"0": 50, "1": 50}), seed=9)
    for name in SPLITS:
        assert splits[name].rows == sorted(splits[name].rows)
        assert len(splits[name].labels) == len(splits[name].texts)


# --------------------------------------------------------------------------------------------- disjointness


def near_duplicates(n: int) -> tuple[Records, dict[str, int]]:
    """n distinct reviews, each present in three spellings that normalise to the same key (no dedupe)."""
    texts, labels, group_of = [], [], {}
    for i in range(n):
        label = str(i % 2)
        for variant in (f"Movie number {i}", f"movie number {i}!", f"  MOVIE   number {i}."):
            texts.append(variant)
            labels.append(label)
            group_of[variant] = i
    return Records(texts, labels, list(range(1, len(texts) + 1))), group_of


@pytest.mark.parametrize("strategy", ["stratified", "random", "contiguous"])
def test_near_duplicates_land_in_one_split(strategy):
    recs, group_of = near_duplicates(60)
    splits = split(recs, seed=5, strategy=strategy, validation=0.2, test=0.2)
    owner: dict[int, set[str]] = {}
    for name in SPLITS:
        for text in splits[name].texts:
            owner.setdefault(group_of[text], set()).add(name)
    assert all(len(names) == 1 for names in owner.values()), owner
    # every spelling of a text is in the split: nothing was dropped
    assert {name: len(splits[name]) % 3 for name in SPLITS} == {name: 0 for name in SPLITS}
    assert_partition(recs, splits)
    check_disjoint(splits, NORMALIZE)  # does not raise
    # split sizes are counted in texts (groups), not rows
    assert [len(splits[n]) // 3 for n in SPLITS] == [36, 12, 12]


def test_check_disjoint_catches_a_leak():
    splits = {
        "train": Records(["Great film", "other"], ["1", "0"], [1, 2]),
        "validation": Records(["fine"], ["1"], [3]),
        "test": Records(["great FILM!"], ["1"], [4]),
    }
    with pytest.raises(AssertionError, match=re.escape("'great FILM!' is in both train and test")):
        check_disjoint(splits, NORMALIZE)
    # with an exact key the two spellings are different texts
    check_disjoint(splits, lambda text: text)


# ------------------------------------------------------------------------------------------- stratification


@pytest.mark.parametrize(("seed", "counts"), [(1, {"a": 37, "b": 163}), (2, {"a": 100, "b": 60, "c": 40})])
def test_stratified_split_keeps_class_proportions(seed, counts):
    recs = labelled(counts)
    splits, strategy, _ = split_records(recs, SplitConfig(seed=seed, validation=0.1, test=0.1), NORMALIZE, "d")
    assert strategy == "stratified"
    total = sum(counts.values())
    for name in SPLITS:
        got = Counter(splits[name].labels)
        n = len(splits[name])
        for label, count in counts.items():
            assert abs(got[label] / n - count / total) < 0.03, (name, label, got)
    assert abs(len(splits["test"]) - 0.1 * total) <= len(counts)
    assert abs(len(splits["validation"]) - 0.1 * total) <= len(counts)


def test_stratified_sizes_are_rounded_per_class():
    splits = split(labelled({"0": 100, "1": 300}), seed=0, validation=0.1, test=0.2)
    assert Counter(splits["test"].labels) == {"0": 20, "1": 60}
    assert Counter(splits["validation"].labels) == {"0": 10, "1": 30}
    assert Counter(splits["train"].labels) == {"0": 70, "1": 210}


def test_random_split_sizes():
    splits = split(labelled({"0": 25, "1": 25}), seed=0, strategy="random", validation=0.2, test=0.2)
    assert [len(splits[n]) for n in SPLITS] == [30, 10, 10]


def test_stratified_split_needs_labels():
    recs = Records(["a", "b"], None, [1, 2])
    with pytest.raises(DataError, match="stratified split needs labels") as info:
        split_records(recs, SplitConfig(strategy="stratified"), NORMALIZE, "corpus.txt")
    assert str(info.value).startswith("corpus.txt: ")


# --------------------------------------------------------------------------------------------- contiguous


def test_contiguous_split_keeps_document_order():
    texts = [f"passage {i}" for i in range(20)]
    recs = Records(texts, None, [i * 3 + 1 for i in range(20)])
    splits, strategy, _ = split_records(recs, SplitConfig(seed=123), NORMALIZE, "corpus.txt")
    assert strategy == "contiguous"  # auto, without labels
    assert splits["train"].texts == texts[:16]
    assert splits["validation"].texts == texts[16:18]
    assert splits["test"].texts == texts[18:]
    assert splits["train"].labels is None
    # seed does not matter for contiguous splits
    other, _, _ = split_records(recs, SplitConfig(seed=7), NORMALIZE, "corpus.txt")
    assert {n: other[n].texts for n in SPLITS} == {n: splits[n].texts for n in SPLITS}


def test_contiguous_split_keeps_a_late_repeat_with_its_first_occurrence():
    texts = [f"passage {i}" for i in range(19)] + ["PASSAGE 0!"]
    recs = Records(texts, None, list(range(1, 21)))
    splits, _, _ = split_records(recs, SplitConfig(strategy="contiguous"), NORMALIZE, "corpus.txt")
    assert splits["train"].texts[0] == "passage 0"
    assert splits["train"].texts[-1] == "PASSAGE 0!"
    assert "PASSAGE 0!" not in splits["test"].texts
    check_disjoint(splits, NORMALIZE)


@pytest.mark.parametrize(
    ("strategy", "has_labels", "expected"),
    [
        ("auto", True, "stratified"),
        ("auto", False, "contiguous"),
        ("random", True, "random"),
        ("contiguous", True, "contiguous"),
        ("stratified", False, "stratified"),
    ],
)
def test_resolve_strategy(strategy, has_labels, expected):
    assert resolve_strategy(SplitConfig(strategy=strategy), has_labels) == expected


# ------------------------------------------------------------------------------------ classes and emptiness


def test_check_classes_present_rejects_a_class_missing_from_a_split():
    recs = labelled({"common": 98, "rare": 2})
    cfg = SplitConfig(seed=0, validation=0.1, test=0.1)
    splits, _, _ = split_records(recs, cfg, NORMALIZE, "data.tsv")
    # two rare rows: round(2 * 0.1) == 0, so validation and test have none of them
    assert "rare" not in splits["validation"].labels
    with pytest.raises(DataError, match=r"the validation split has no rows of class 'rare'") as info:
        check_classes_present(splits, ["common", "rare"], cfg, "data.tsv")
    assert info.value.path == "data.tsv"
    assert "add data or change data.split" in str(info.value)


def test_check_classes_present_reports_test_split_when_validation_is_off():
    recs = labelled({"common": 98, "rare": 2})
    cfg = SplitConfig(seed=0, validation=0.0, test=0.1)
    splits, _, _ = split_records(recs, cfg, NORMALIZE, "data.tsv")
    assert len(splits["validation"]) == 0
    with pytest.raises(DataError, match=r"the test split has no rows of class 'rare'"):
        check_classes_present(splits, ["common", "rare"], cfg, "data.tsv")


def test_check_classes_present_accepts_every_class_everywhere():
    recs = labelled({"a": 30, "b": 30})
    cfg = SplitConfig(seed=0)
    splits, _, _ = split_records(recs, cfg, NORMALIZE, "data.tsv")
    check_classes_present(splits, ["a", "b"], cfg, "data.tsv")  # does not raise
    # a declared class that never occurs is missing from every split, train first
    with pytest.raises(DataError, match=r"the train split has no rows of class 'c'"):
        check_classes_present(splits, ["a", "b", "c"], cfg, "data.tsv")


def test_check_classes_present_rejects_an_empty_split():
    recs = Records([f"passage {i}" for i in range(3)], None, [1, 2, 3])
    cfg = SplitConfig()
    splits, _, _ = split_records(recs, cfg, NORMALIZE, "corpus.txt")
    assert len(splits["validation"]) == 0  # round(3 * 0.1) == 0
    with pytest.raises(DataError, match="the validation split is empty; the data set is too small"):
        check_classes_present(splits, [], cfg, "corpus.txt")


def test_check_classes_present_ignores_splits_that_are_turned_off():
    recs = Records([f"passage {i}" for i in range(3)], None, [1, 2, 3])
    cfg = SplitConfig(validation=0.0, test=0.0)
    splits, _, _ = split_records(recs, cfg, NORMALIZE, "corpus.txt")
    assert [len(splits[n]) for n in SPLITS] == [3, 0, 0]
    check_classes_present(splits, [], cfg, "corpus.txt")  # does not raise
