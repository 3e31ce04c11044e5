"""Metrics: hand-computed values on small fixed cases, sklearn agreement, and the all-reduce property of the counts."""

from __future__ import annotations

import math
import random

import pytest
import torch

from raytune_ft.metrics import (
    classification_metrics,
    confusion_matrix,
    pack_counts,
    perplexity,
    slice_metrics,
    unpack_counts,
    whole_metrics,
)

NAMES = ["a", "b", "c", "d"]
# c has support 2 but is never predicted; d has no support but is predicted once.
LABELS = [0, 0, 0, 1, 1, 2, 2]
PREDS = [0, 0, 1, 1, 3, 0, 1]


def metrics_of(preds: list[int], labels: list[int], names: list[str]) -> dict[str, float]:
    return classification_metrics(confusion_matrix(torch.tensor(preds), torch.tensor(labels), len(names)), names)


def test_confusion_matrix_rows_are_true_class_columns_predicted():
    confusion = confusion_matrix(torch.tensor(PREDS), torch.tensor(LABELS), 4)
    assert confusion.dtype == torch.int64
    assert confusion.tolist() == [
        [2, 1, 0, 0],
        [0, 1, 0, 1],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
    ]


def test_confusion_matrix_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="label ids"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="prediction ids"):
        confusion_matrix(torch.tensor([-1, 1]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1]), 3)


def test_hand_computed_with_never_predicted_and_zero_support_classes():
    m = metrics_of(PREDS, LABELS, NAMES)
    assert m["accuracy"] == pytest.approx(3 / 7)
    # a: tp 2, predicted 3, support 3.
    assert m["precision/a"] == pytest.approx(2 / 3)
    assert m["recall/a"] == pytest.approx(2 / 3)
    assert m["f1/a"] == pytest.approx(2 / 3)
    assert m["support/a"] == 3.0
    # b: tp 1, predicted 3, support 2 -> F1 = 2PR/(P+R) = 2/5.
    assert m["precision/b"] == pytest.approx(1 / 3)
    assert m["recall/b"] == pytest.approx(1 / 2)
    assert m["f1/b"] == pytest.approx(2 / 5)
    assert m["support/b"] == 2.0
    # c: never predicted -> precision is 0/0, reported as 0.
    assert (m["precision/c"], m["recall/c"], m["f1/c"], m["support/c"]) == (0.0, 0.0, 0.0, 2.0)
    # d: no support -> recall is 0/0, reported as 0; precision 0/1.
    assert (m["precision/d"], m["recall/d"], m["f1/d"], m["support/d"]) == (0.0, 0.0, 0.0, 0.0)
    # Macro over all four classes, the zero-support one included.
    assert m["f1_macro"] == pytest.approx((2 / 3 + 2 / 5 + 0 + 0) / 4)
    assert set(m) == {"accuracy", "f1_macro"} | {
        f"{k}/{n}" for k in ("precision", "recall", "f1", "support") for n in NAMES
    }


def test_perfect_predictions():
    labels = [0, 1, 2, 2, 1, 0, 2]
    m = metrics_of(labels, labels, ["x", "y", "z"])
    assert m["accuracy"] == 1.0
    assert m["f1_macro"] == 1.0
    assert [m[f"f1/{n}"] for n in "xyz"] == [1.0, 1.0, 1.0]
    assert [m[f"support/{n}"] for n in "xyz"] == [2.0, 2.0, 3.0]


def test_perfect_predictions_with_an_absent_class_count_it_as_zero_in_the_macro():
    m = metrics_of([0, 1, 1], [0, 1, 1], ["x", "y", "z"])
    assert m["accuracy"] == 1.0
    assert m["f1/z"] == 0.0
    assert m["f1_macro"] == pytest.approx(2 / 3)


def test_all_wrong_predictions():
    m = metrics_of([1, 2, 0, 1], [0, 1, 2, 0], ["x", "y", "z"])
    assert m["accuracy"] == 0.0
    assert m["f1_macro"] == 0.0
    assert all(m[f"{k}/{n}"] == 0.0 for k in ("precision", "recall", "f1") for n in "xyz")


def test_empty_confusion_gives_zeros_not_nan():
    m = classification_metrics(torch.zeros((2, 2), dtype=torch.long), ["x", "y"])
    assert m["accuracy"] == 0.0
    assert m["f1_macro"] == 0.0


def test_classification_metrics_rejects_mismatched_or_duplicate_names():
    with pytest.raises(ValueError, match="does not fit"):
        classification_metrics(torch.zeros((3, 3), dtype=torch.long), ["x", "y"])
    with pytest.raises(ValueError, match="distinct"):
        classification_metrics(torch.zeros((2, 2), dtype=torch.long), ["x", "x"])


def test_agrees_with_sklearn():
    import sklearn.metrics as sk  # scikit-learn comes with the dev extras (raytune_ft[pb2])

    rng = random.Random(0)
    k = 6
    names = [f"class{i}" for i in range(k)]
    # Class 4 is predicted but has no support, class 5 appears nowhere.
    labels = [rng.randrange(4) for _ in range(200)]
    preds = [rng.randrange(5) for _ in range(200)]
    confusion = confusion_matrix(torch.tensor(preds), torch.tensor(labels), k)
    m = classification_metrics(confusion, names)
    everything = list(range(k))
    assert confusion.tolist() == sk.confusion_matrix(labels, preds, labels=everything).tolist()
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(labels, preds))
    assert m["f1_macro"] == pytest.approx(
        sk.f1_score(labels, preds, labels=everything, average="macro", zero_division=0)
    )
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        labels, preds, labels=everything, average=None, zero_division=0
    )
    for i, name in enumerate(names):
        assert m[f"precision/{name}"] == pytest.approx(precision[i])
        assert m[f"recall/{name}"] == pytest.approx(recall[i])
        assert m[f"f1/{name}"] == pytest.approx(f1[i])
        assert m[f"support/{name}"] == support[i]


def test_pack_unpack_round_trip_is_exact():
    # Counts beyond int32 and near float64's exact-integer limit must survive.
    confusion = torch.tensor([[2**40, 3], [0, 2**52 + 1]], dtype=torch.long)
    packed = pack_counts(12.375, 2**45 + 7, confusion)
    assert packed.dtype == torch.float64 and packed.dim() == 1 and packed.numel() == 6
    loss_sum, n, back = unpack_counts(packed, 2)
    assert loss_sum == 12.375
    assert n == 2**45 + 7
    assert back.dtype == torch.int64
    assert torch.equal(back, confusion)


def test_pack_unpack_without_confusion_for_language_models():
    packed = pack_counts(1234.5, 987, None)
    assert packed.tolist() == [1234.5, 987.0]
    assert unpack_counts(packed, None) == (1234.5, 987, None)


def test_unpack_rejects_a_tensor_of_the_wrong_size():
    with pytest.raises(ValueError, match="expected"):
        unpack_counts(pack_counts(1.0, 2, torch.zeros((2, 2), dtype=torch.long)), 3)
    with pytest.raises(ValueError, match="expected"):
        unpack_counts(pack_counts(1.0, 2, torch.zeros((2, 2), dtype=torch.long)), None)


def test_summed_packs_equal_metrics_of_the_concatenated_data():
    """What one all-reduce(SUM) over workers does: the sum of the parts must score like the whole."""
    k, names = 4, NAMES
    rng = random.Random(1)
    preds = [rng.randrange(k) for _ in range(50)]
    labels = [rng.randrange(k) for _ in range(50)]
    losses = [rng.random() for _ in range(50)]
    parts = [range(0, 50, 2), range(1, 50, 2)]  # rank::world, as the training loop slices the data

    packed = torch.zeros(2 + k * k, dtype=torch.float64)
    for rows in parts:
        confusion = confusion_matrix(torch.tensor([preds[i] for i in rows]), torch.tensor([labels[i] for i in rows]), k)
        packed += pack_counts(sum(losses[i] for i in rows), len(rows), confusion)
    loss_sum, n, confusion = unpack_counts(packed, k)

    whole = confusion_matrix(torch.tensor(preds), torch.tensor(labels), k)
    assert n == 50
    assert loss_sum == pytest.approx(sum(losses))
    assert torch.equal(confusion, whole)
    assert classification_metrics(confusion, names) == classification_metrics(whole, names)


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(5.0)) == pytest.approx(5.0)
    assert perplexity(2.0) == pytest.approx(7.38905609893065)
    assert perplexity(700.0) == pytest.approx(math.exp(700.0))
    assert perplexity(701.0) == float("inf")
    assert perplexity(1e6) == float("inf")


def test_slice_metrics_finds_the_worst_slice_and_the_gap():
    names = ["neg", "pos"]
    rows = [
        # en: all right.
        ("en", 0, 0),
        ("en", 1, 1),
        ("en", 0, 0),
        ("en", 1, 1),
        # de: one positive called negative -> F1 neg 4/5, pos 2/3.
        ("de", 0, 0),
        ("de", 1, 0),
        ("de", 0, 0),
        ("de", 1, 1),
        # fr: one positive called negative -> F1 neg 2/3, pos 2/3.
        ("fr", 0, 0),
        ("fr", 1, 0),
        ("fr", 1, 1),
    ]
    slices, labels, preds = (list(col) for col in zip(*rows, strict=True))
    result = slice_metrics(preds, labels, slices, names)

    assert list(result["slices"]) == ["de", "en", "fr"]
    assert result["slices"]["en"] == {"rows": 4, "accuracy": 1.0, "f1_macro": 1.0}
    assert result["slices"]["de"]["rows"] == 4
    assert result["slices"]["de"]["accuracy"] == pytest.approx(3 / 4)
    assert result["slices"]["de"]["f1_macro"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert result["slices"]["fr"]["rows"] == 3
    assert result["slices"]["fr"]["accuracy"] == pytest.approx(2 / 3)
    assert result["slices"]["fr"]["f1_macro"] == pytest.approx(2 / 3)
    assert result["worst_slice"] == "fr"
    assert result["best_slice"] == "en"
    assert result["f1_macro_gap"] == pytest.approx(1 / 3)


def test_slice_macro_f1_ignores_classes_absent_from_the_slice():
    # "es" only has positives, all right: a perfect slice, not a 1/3 one. "it" only has positives, all missed.
    result = slice_metrics([1, 1, 0, 0], [1, 1, 1, 1], ["es", "es", "it", "it"], ["neg", "pos", "neutral"])
    assert result["slices"]["es"] == {"rows": 2, "accuracy": 1.0, "f1_macro": 1.0}
    # it: neg has no support but two predictions (F1 0), pos 0 of 2 -> both present, both 0.
    assert result["slices"]["it"]["accuracy"] == 0.0
    assert result["slices"]["it"]["f1_macro"] == 0.0
    assert (result["worst_slice"], result["best_slice"], result["f1_macro_gap"]) == ("it", "es", 1.0)


def test_slice_metrics_single_slice_and_ties():
    result = slice_metrics([0, 1], [0, 1], ["all", "all"], ["x", "y"])
    assert result["worst_slice"] == result["best_slice"] == "all"
    assert result["f1_macro_gap"] == 0.0
    # Equal scores: the first value in sorted order is both worst and best, so reports are stable.
    tied = slice_metrics([0, 0], [0, 0], ["b", "a"], ["x", "y"])
    assert (tied["worst_slice"], tied["best_slice"]) == ("a", "a")


def test_slice_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="slice values"):
        slice_metrics([0, 1], [0, 1], ["a"], ["x", "y"])
    with pytest.raises(ValueError, match="no rows"):
        slice_metrics([], [], [], ["x", "y"])


def test_whole_metrics_count_only_the_whole_rows():
    # four rows, the first three whole: 2 of them right; the fourth (a phrase) is ignored, right or wrong
    found = whole_metrics([1, 0, 0, 1], [1, 1, 0, 0], [True, True, True, False], ["neg", "pos"])
    assert found["whole_rows"] == 3 and found["whole_accuracy"] == pytest.approx(2 / 3)
    # neg: precision 1/2, recall 1 -> F1 2/3; pos: precision 1, recall 1/2 -> F1 2/3
    assert found["whole_f1_macro"] == pytest.approx(2 / 3)
    assert whole_metrics([0], [0], [False], ["neg", "pos"]) == {}
