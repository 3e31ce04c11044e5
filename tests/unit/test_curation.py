"""Curation steps on fixtures with known repeats, near-repeats and label conflicts."""

from __future__ import annotations

from collections import Counter

import pytest

from raytune_ft.config.schema import NormalizeConfig
from raytune_ft.data import curation
from raytune_ft.data.readers import Records

ALL_ON = NormalizeConfig()
NFKC_ONLY = NormalizeConfig(lowercase=False, collapse_whitespace=False, strip_punctuation=False)
NORMALIZE = curation.normalizer(ALL_ON)


def records(pairs: list[tuple[str, str]]) -> Records:
    """Records with source rows 2, 3, ... like a file with a header line."""
    return Records([t for t, _ in pairs], [label for _, label in pairs], list(range(2, len(pairs) + 2)))


@pytest.fixture
def conflicted() -> Records:
    return records(
        [
            ("good film", "1"),  # 0
            ("good film", "1"),  # 1 exact repeat, same label
            ("good film", "0"),  # 2 exact repeat, other label
            ("Good  film!", "1"),  # 3 repeat after normalisation only
            ("bad film", "0"),  # 4
            ("bad film", "1"),  # 5 exact conflict, a 1:1 tie
            ("plain", "0"),  # 6 unique
        ]
    )


# ---------------------------------------------------------------------------------------------- normalizer


@pytest.mark.parametrize(
    ("cfg", "text", "expected"),
    [
        (ALL_ON, "  Hello,   WORLD!  ", "hello world"),
        (NormalizeConfig(lowercase=False), "Hello,  World!", "Hello World"),
        (NormalizeConfig(collapse_whitespace=False), "Hello,  World!\t", "hello  world\t"),
        (NormalizeConfig(strip_punctuation=False), "Hello,  World!", "hello, world!"),
        (NFKC_ONLY, " A  b! ", " A  b! "),
        # NFKC is always applied: ligatures and full-width forms fold to plain letters
        (NFKC_ONLY, "ﬁne Ｆｉｌｍ", "fine Film"),
        (ALL_ON, "ﬁne Ｆｉｌｍ", "fine film"),
        # typographic quotes, dashes and ellipsis count as punctuation; a removed dash leaves one space
        (ALL_ON, "“Great” — film…", "great film"),
        (NormalizeConfig(collapse_whitespace=False), "a - b", "a  b"),
        # casefold, not lower
        (ALL_ON, "STRASSE Straße", "strasse strasse"),
        (ALL_ON, "it 's a film", "it s a film"),
    ],
    ids=[
        "all-on",
        "keep-case",
        "keep-whitespace",
        "keep-punctuation",
        "all-off",
        "nfkc-always",
        "nfkc-and-case",
        "typographic-punctuation",
        "dash-without-collapse",
        "casefold",
        "apostrophe",
    ],
)
def test_normalizer_toggles(cfg, text, expected):
    assert curation.normalizer(cfg)(text) == expected


def test_exact_key_is_identity():
    assert curation.exact(" Good film! ") == " Good film! "


# ----------------------------------------------------------------------------------------- repeat findings


def test_repeat_findings_exact(conflicted):
    found = curation.repeat_findings(conflicted, curation.exact)
    assert found["repeated_rows"] == 3  # two extra "good film", one extra "bad film"
    assert found["texts_repeated"] == 2
    # rows whose label differs from the group's first row: row 2 ("good film"/0) and row 5 ("bad film"/1)
    assert found["repeats_with_conflicting_label"] == 2
    assert found["texts_with_conflicting_labels"] == 2
    assert found["rows_in_conflicting_texts"] == 5
    assert found["conflict_examples"] == [
        {"text": "good film", "lines": [2, 3, 4], "labels": ["1", "1", "0"]},
        {"text": "bad film", "lines": [6, 7], "labels": ["0", "1"]},
    ]
    assert [ex["text"] for ex in found["repeat_examples"]] == ["good film", "bad film"]


def test_repeat_findings_normalized_counts_near_repeats(conflicted):
    found = curation.repeat_findings(conflicted, NORMALIZE)
    assert found["repeated_rows"] == 4  # "Good  film!" joins the "good film" group
    assert found["texts_repeated"] == 2
    assert found["repeats_with_conflicting_label"] == 2  # "Good  film!" has the first row's label
    assert found["texts_with_conflicting_labels"] == 2
    assert found["rows_in_conflicting_texts"] == 6
    assert found["conflict_examples"][0]["lines"] == [2, 3, 4, 5]


def test_repeat_findings_counts_every_disagreeing_copy():
    recs = records([("x", "a"), ("x", "b"), ("x", "b"), ("x", "a"), ("x", "c")])
    found = curation.repeat_findings(recs, curation.exact)
    assert found["repeated_rows"] == 4
    assert found["texts_repeated"] == 1
    assert found["repeats_with_conflicting_label"] == 3  # b, b and c differ from the first a
    assert found["texts_with_conflicting_labels"] == 1


def test_repeat_findings_without_labels_has_no_conflict_keys():
    recs = Records(["a", "b", "a", "A", "a"], None, [1, 2, 3, 4, 5])
    found = curation.repeat_findings(recs, curation.exact)
    assert found == {
        "repeated_rows": 2,
        "texts_repeated": 1,
        "repeat_examples": [{"text": "a", "lines": [1, 3, 5]}],
    }
    assert curation.repeat_findings(recs, NORMALIZE)["repeated_rows"] == 3


def test_repeat_findings_examples_are_capped():
    pairs = [(f"text {i}", "1") for i in range(8) for _ in range(2)]
    found = curation.repeat_findings(records(pairs), curation.exact)
    assert found["repeated_rows"] == 8
    assert len(found["repeat_examples"]) == curation.MAX_EXAMPLES
    assert found["conflict_examples"] == []


def test_repeat_findings_on_unique_rows():
    found = curation.repeat_findings(records([("a", "1"), ("b", "0")]), NORMALIZE)
    assert found["repeated_rows"] == found["texts_repeated"] == found["repeats_with_conflicting_label"] == 0
    assert found["repeat_examples"] == []


# ------------------------------------------------------------------------------------ drop_empty / lengths


def test_drop_empty_removes_whitespace_only_texts():
    recs = records([("a", "1"), ("", "0"), ("  \t", "1"), ("\n", "0"), (" b ", "1")])
    kept, step = curation.drop_empty(recs)
    assert kept.texts == ["a", " b "]
    assert kept.labels == ["1", "1"]
    assert kept.rows == [2, 6]
    assert step.as_dict() == {"name": "drop_empty", "rows_in": 5, "rows_out": 2, "removed": 3}


@pytest.mark.parametrize(
    ("min_chars", "max_chars", "kept", "too_short", "too_long"),
    [
        (3, 6, ["abc", "  abcdef  "], 1, 1),  # surrounding whitespace does not count
        (0, None, ["ab", "abc", "  abcdef  ", "abcdefg"], 0, 0),
        (4, None, ["  abcdef  ", "abcdefg"], 2, 0),
        (0, 3, ["ab", "abc"], 0, 2),
    ],
)
def test_length_filter(min_chars, max_chars, kept, too_short, too_long):
    recs = records([("ab", "0"), ("abc", "1"), ("  abcdef  ", "0"), ("abcdefg", "1")])
    out, step = curation.length_filter(recs, min_chars, max_chars)
    assert out.texts == kept
    assert step.as_dict() == {
        "name": "length_filter",
        "rows_in": 4,
        "rows_out": len(kept),
        "removed": 4 - len(kept),
        "min_chars": min_chars,
        "max_chars": max_chars,
        "too_short": too_short,
        "too_long": too_long,
    }


# ---------------------------------------------------------------------------------------------- conflicts


def test_resolve_conflicts_drop_removes_every_copy(conflicted):
    kept, step = curation.resolve_conflicts(conflicted, curation.exact, "drop")
    # "good film" (3 exact copies) and "bad film" go; the near-repeat "Good  film!" is its own exact text
    assert kept.texts == ["Good  film!", "plain"]
    assert kept.rows == [5, 8]
    assert step.name == "conflicts_drop"
    assert step.details == {"mode": "drop", "conflicting_texts": 2}
    assert (step.rows_in, step.rows_out) == (7, 2)


def test_resolve_conflicts_drop_with_normalized_key_removes_near_repeats_too(conflicted):
    kept, _ = curation.resolve_conflicts(conflicted, NORMALIZE, "drop")
    assert kept.texts == ["plain"]


def test_resolve_conflicts_majority_keeps_the_majority_and_drops_ties(conflicted):
    kept, step = curation.resolve_conflicts(conflicted, NORMALIZE, "majority")
    # "good film" group is 1,1,0,1 -> keep the three 1s; "bad film" is a 1:1 tie -> dropped
    assert kept.texts == ["good film", "good film", "Good  film!", "plain"]
    assert kept.labels == ["1", "1", "1", "0"]
    assert step.name == "conflicts_majority"
    assert step.details == {"mode": "majority", "conflicting_texts": 2}
    assert step.as_dict()["removed"] == 3


@pytest.mark.parametrize(
    ("labels", "kept_labels"),
    [
        (["a", "b", "a", "c", "a"], ["a", "a", "a"]),  # clear majority among three labels
        (["a", "b", "b", "a", "c"], []),  # tie at the top among three labels
        (["a", "a", "b", "b"], []),  # two-way tie
    ],
    ids=["three-labels-majority", "three-labels-tie", "two-way-tie"],
)
def test_resolve_conflicts_majority_multi_label(labels, kept_labels):
    recs = records([("same text", label) for label in labels] + [("other", "z")])
    kept, _ = curation.resolve_conflicts(recs, curation.exact, "majority")
    assert kept.labels == [*kept_labels, "z"]


def test_resolve_conflicts_leaves_agreeing_repeats_alone():
    recs = records([("x", "1"), ("x", "1"), ("y", "0")])
    kept, step = curation.resolve_conflicts(recs, curation.exact, "drop")
    assert kept.texts == ["x", "x", "y"]
    assert step.details["conflicting_texts"] == 0


# -------------------------------------------------------------------------------------------------- dedupe


def test_dedupe_exact_vs_normalized(conflicted):
    exact_kept, exact_step = curation.dedupe(conflicted, curation.exact, "dedupe_exact")
    assert exact_kept.texts == ["good film", "Good  film!", "bad film", "plain"]
    assert exact_kept.rows == [2, 5, 6, 8]  # the first row of each text is kept
    assert exact_step.as_dict() == {"name": "dedupe_exact", "rows_in": 7, "rows_out": 4, "removed": 3}

    norm_kept, norm_step = curation.dedupe(conflicted, NORMALIZE, "dedupe_normalized")
    assert norm_kept.texts == ["good film", "bad film", "plain"]
    assert norm_kept.labels == ["1", "0", "0"]
    assert norm_step.name == "dedupe_normalized"
    assert norm_step.rows_out == 3


def test_dedupe_without_labels():
    recs = Records(["a", "A.", "b"], None, [1, 2, 3])
    kept, _ = curation.dedupe(recs, NORMALIZE, "dedupe_normalized")
    assert kept.texts == ["a", "b"]
    assert kept.labels is None


# ---------------------------------------------------------------------------------------------- downsample


@pytest.fixture
def unbalanced() -> Records:
    labels = ["1"] * 10 + ["0"] * 4 + ["2"] * 6
    return records([(f"text {i}", label) for i, label in enumerate(labels)])


def test_downsample_equalises_classes(unbalanced):
    kept, step = curation.downsample(unbalanced, seed=7)
    assert Counter(kept.labels) == {"0": 4, "1": 4, "2": 4}
    assert step.as_dict() == {
        "name": "balance_downsample",
        "rows_in": 20,
        "rows_out": 12,
        "removed": 8,
        "per_class": 4,
    }
    # the smallest class is kept whole, and the original order is preserved
    smallest = [t for t, label in zip(kept.texts, kept.labels, strict=True) if label == "0"]
    assert smallest == [f"text {i}" for i in range(10, 14)]
    assert kept.rows == sorted(kept.rows)
    assert all(unbalanced.texts[row - 2] == text for row, text in zip(kept.rows, kept.texts, strict=True))


def test_downsample_is_deterministic_per_seed(unbalanced):
    first, _ = curation.downsample(unbalanced, seed=1)
    again, _ = curation.downsample(unbalanced, seed=1)
    assert first.texts == again.texts
    others = {tuple(curation.downsample(unbalanced, seed=s)[0].texts) for s in range(2, 8)}
    assert len(others | {tuple(first.texts)}) > 1, "different seeds should pick different rows"


def test_downsample_of_balanced_data_keeps_everything():
    recs = records([("a", "x"), ("b", "y"), ("c", "x"), ("d", "y")])
    kept, step = curation.downsample(recs, seed=0)
    assert kept.texts == ["a", "b", "c", "d"]
    assert step.rows_in == step.rows_out == 4


# ------------------------------------------------------------------------------------- weights and classes


def test_class_weights_inverse_frequency():
    weights = curation.class_weights(["a", "a", "a", "b"], ["a", "b", "c"])
    # n / (k * n_c) with n=4, k=3; a class absent from the labels gets 0
    assert weights == {"a": round(4 / 9, 6), "b": round(4 / 3, 6), "c": 0.0}


def test_class_weights_balanced_is_one():
    assert curation.class_weights(["x", "y", "y", "x"], ["x", "y"]) == {"x": 1.0, "y": 1.0}


def test_class_balance():
    assert curation.class_balance(None, ["a"]) is None
    assert curation.class_balance(["a"], None) is None
    assert curation.class_balance(["a", "a", "b"], ["a", "b", "c"]) == {
        "a": {"rows": 2, "fraction": 0.6667},
        "b": {"rows": 1, "fraction": 0.3333},
        "c": {"rows": 0, "fraction": 0.0},
    }
    assert curation.class_balance([], ["a"]) == {"a": {"rows": 0, "fraction": 0.0}}


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (["10", "2", "-1", "0", "2", "1"], ["-1", "0", "1", "2", "10"]),  # numeric order, not "10" < "2"
        (["pos", "neg", "Neutral", "neg"], ["Neutral", "neg", "pos"]),
        (["1", "a", "10", "2"], ["1", "10", "2", "a"]),  # mixed: plain string order
        (["1.5", "10", "2"], ["1.5", "10", "2"]),  # not all integers
    ],
    ids=["integers", "strings", "mixed", "decimal"],
)
def test_infer_classes(labels, expected):
    assert curation.infer_classes(labels) == expected
