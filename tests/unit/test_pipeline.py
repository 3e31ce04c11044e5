"""prepare_data end to end: counted steps, reuse, the write-once test split, tokens, and the real SST-2 file."""

from __future__ import annotations

import hashlib
import json
import re
import stat
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from shared_data import shared_data

from raytune_ft.data import (
    DataError,
    data_dir_for,
    load_split,
    load_test_split,
    prepare_data,
    reads_of_test_split,
)
from raytune_ft.data.curation import normalizer
from raytune_ft.data.split import SPLITS

SMALL_SPLIT = {"validation": 0.2, "test": 0.2}
# rows made of the same few words contain one another: grouping them is test_overlap.py's subject, not these tests'
NO_GROUPING = {"containment": False, "near_duplicates": False}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def texts_of(data_dir: Path, name: str) -> list[str]:
    return texts_of_column(data_dir, name, "text")


def texts_of_column(data_dir: Path, name: str, column: str) -> list:
    return pq.read_table(data_dir / f"{name}.parquet").column(column).to_pylist()


def step_counts(report: dict) -> list[tuple[str, int, int]]:
    return [(s["name"], s["rows_in"], s["rows_out"]) for s in report["steps"]]


def without_examples(found: dict) -> dict:
    return {k: v for k, v in found.items() if not k.endswith("_examples")}


@pytest.fixture
def review_cfg(make_config, review_tsv):
    def build(**data):
        return make_config({"path": str(review_tsv), "split": dict(SMALL_SPLIT), **data})

    return build


# ------------------------------------------------------------------------------------------- report counts


def test_report_counts_every_step(review_cfg, review_tsv, tmp_path):
    cfg = review_cfg()
    prepared = prepare_data(cfg, with_tokens=False)
    report = prepared.report
    assert prepared.reused is False
    assert prepared.replaced is None
    assert prepared.data_dir == data_dir_for(cfg) == tmp_path / "runs" / "exp" / "data"

    assert report["source"] == {"path": str(review_tsv), "format": "tsv", "rows_read": 28, "rows_used": 28}
    assert without_examples(report["findings"]["exact"]) == {
        "repeated_rows": 3,
        "texts_repeated": 2,
        "repeats_with_conflicting_label": 1,
        "texts_with_conflicting_labels": 1,
        "rows_in_conflicting_texts": 2,
    }
    assert without_examples(report["findings"]["normalized"]) == {
        "repeated_rows": 5,
        "texts_repeated": 4,
        "repeats_with_conflicting_label": 2,
        "texts_with_conflicting_labels": 2,
        "rows_in_conflicting_texts": 4,
    }
    assert report["findings"]["exact"]["conflict_examples"] == [
        {"text": "an odd film", "lines": [25, 26], "labels": ["1", "0"]}
    ]
    assert step_counts(report) == [
        ("drop_empty", 28, 27),
        ("conflicts_drop", 27, 23),  # "an odd film" x2 and "a mixed film"/"A MIXED FILM." (normalised key)
        ("dedupe_exact", 23, 21),
        ("dedupe_normalized", 21, 20),
    ]
    assert report["steps"][1]["conflicting_texts"] == 2
    assert report["classes"] == ["0", "1"]
    assert report["class_weights"] is None
    assert report["split"] == {
        "strategy": "stratified",
        "seed": 42,
        "validation": 0.2,
        "test": 0.2,
        "disjoint_after_normalization": True,
        "grouping": report["split"]["grouping"],  # its own tests: test_overlap.py
    }
    assert {n: report["splits"][n]["rows"] for n in SPLITS} == {"train": 12, "validation": 4, "test": 4}
    half = {"rows": 2, "fraction": 0.5}
    assert report["splits"]["test"]["class_balance"] == {"0": half, "1": half}
    assert "tokens" not in report

    # the files agree with the report
    data_dir = prepared.data_dir
    assert json.loads((data_dir / "data_report.json").read_text()) == report
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["fingerprint"] == report["fingerprint"]
    assert manifest["files"] == {f"{n}.parquet": sha(data_dir / f"{n}.parquet") for n in SPLITS}
    assert stat.S_IMODE((data_dir / "test.parquet").stat().st_mode) == 0o444


def test_split_files_hold_curated_rows_with_label_ids_and_source_lines(review_cfg, review_tsv):
    prepared = prepare_data(review_cfg(), with_tokens=False)
    lines = review_tsv.read_text().split("\n")
    normalize = normalizer(review_cfg().data.curation.normalize)
    seen: dict[str, str] = {}
    for name in SPLITS:
        table = pq.read_table(prepared.data_dir / f"{name}.parquet")
        assert table.column_names == ["text", "label", "label_id", "whole", "source_line"]
        for row in table.to_pylist():
            assert row["label_id"] == ["0", "1"].index(row["label"])
            # source_line is the 1-based line of the row in the TSV file
            assert lines[row["source_line"] - 1] == f"{row['text']}\t{row['label']}"
            assert seen.setdefault(normalize(row["text"]), name) == name
    assert len(seen) == 20
    assert not {"an odd film", "a mixed film", ""} & set(seen)


@pytest.mark.parametrize(
    ("curation", "expected_steps", "rows_after"),
    [
        ({"drop_empty": False, "dedupe": "none", "conflicts": "keep"}, [], 28),
        (
            {"dedupe": "exact", "conflicts": "majority"},
            # with exact dedupe, conflicts are found by exact text: only "an odd film" (a tie, so dropped)
            [("drop_empty", 28, 27), ("conflicts_majority", 27, 25), ("dedupe_exact", 25, 23)],
            23,
        ),
        (
            {"min_chars": 12},
            # "an odd film" has 11 characters
            [
                ("drop_empty", 28, 27),
                ("length_filter", 27, 25),
                ("conflicts_drop", 25, 23),
                ("dedupe_exact", 23, 21),
                ("dedupe_normalized", 21, 20),
            ],
            20,
        ),
    ],
    ids=["everything-off", "exact-majority", "min-chars"],
)
def test_curation_settings_decide_the_steps(review_cfg, curation, expected_steps, rows_after):
    prepared = prepare_data(review_cfg(curation=curation), with_tokens=False)
    assert step_counts(prepared.report) == expected_steps
    assert sum(prepared.report["splits"][n]["rows"] for n in SPLITS) == rows_after
    # near-duplicates are never split apart, whether or not they were de-duplicated
    normalize = normalizer(review_cfg().data.curation.normalize)
    owners = [{normalize(t) for t in texts_of(prepared.data_dir, n)} for n in SPLITS]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])


def test_dedupe_off_keeps_near_duplicates_together(review_cfg, positive_texts, negative_texts):
    prepared = prepare_data(review_cfg(curation={"dedupe": "none", "conflicts": "keep"}), with_tokens=False)
    where = {n: texts_of(prepared.data_dir, n) for n in SPLITS}
    owner_of_pos0 = [n for n in SPLITS if positive_texts[0] in where[n]]
    assert len(owner_of_pos0) == 1
    assert where[owner_of_pos0[0]].count(positive_texts[0]) == 3
    owner_of_neg0 = [n for n in SPLITS if negative_texts[0] in where[n]]
    assert negative_texts[0].upper() + "!!" in where[owner_of_neg0[0]]
    mixed = [n for n in SPLITS if "a mixed film" in where[n]]
    assert "A MIXED FILM." in where[mixed[0]]


def test_balance_downsample_trims_the_training_split(make_config, tmp_path, write_tsv, review_rows):
    extra = [(f"a truly good film number ten {n}", "1") for n in ("one", "two", "three", "four")]
    path = write_tsv(tmp_path / "more.tsv", review_rows + extra)
    cfg = make_config({"path": str(path), "split": SMALL_SPLIT, "curation": {"balance": "downsample"}})
    report = prepare_data(cfg, with_tokens=False).report
    # after curation: 14 positive, 10 negative; train gets 8 + 6 and is cut to 6 + 6
    assert report["steps"][-1] == {
        "name": "balance_downsample",
        "rows_in": 14,
        "rows_out": 12,
        "removed": 2,
        "per_class": 6,
    }
    assert {c: v["rows"] for c, v in report["splits"]["train"]["class_balance"].items()} == {"0": 6, "1": 6}
    assert report["splits"]["test"]["rows"] == 5  # other splits are not balanced
    assert len(texts_of(data_dir_for(cfg), "train")) == 12


def test_balance_class_weights_come_from_the_training_split(make_config, tmp_path, write_tsv, review_rows):
    extra = [(f"a truly good film number ten {n}", "1") for n in ("one", "two", "three", "four")]
    path = write_tsv(tmp_path / "more.tsv", review_rows + extra)
    cfg = make_config({"path": str(path), "split": SMALL_SPLIT, "curation": {"balance": "class_weights"}})
    report = prepare_data(cfg, with_tokens=False).report
    assert report["splits"]["train"]["rows"] == 14
    assert report["class_weights"] == {"0": round(14 / 12, 6), "1": round(14 / 16, 6)}
    assert "balance_downsample" not in [s["name"] for s in report["steps"]]


def test_max_rows_reads_the_head_of_the_file(review_cfg):
    report = prepare_data(review_cfg(max_rows=20), with_tokens=False).report
    assert report["source"]["rows_read"] == 28
    assert report["source"]["rows_used"] == 20
    assert report["findings"]["exact"]["repeated_rows"] == 0
    assert step_counts(report)[0] == ("drop_empty", 20, 20)


def test_declared_labels_fix_the_label_ids(review_cfg):
    prepared = prepare_data(review_cfg(labels=[1, 0], label_names=["positive", "negative"]), with_tokens=False)
    assert prepared.report["classes"] == ["1", "0"]
    assert prepared.report["label_names"] == ["positive", "negative"]
    rows = load_split(prepared.data_dir, "train").to_pylist()
    assert {r["label"]: r["label_id"] for r in rows} == {"1": 0, "0": 1}


def test_on_stage_reports_progress(review_cfg):
    stages: list[str] = []
    prepare_data(review_cfg(), with_tokens=False, on_stage=stages.append)
    assert stages == [
        "hashing reviews.tsv",
        "reading reviews.tsv",
        "curating",
        "splitting",
        "measuring overlap between splits",
        "writing splits",
    ]
    stages.clear()
    prepare_data(review_cfg(), with_tokens=False, on_stage=stages.append)
    assert stages == ["hashing reviews.tsv"]


# ------------------------------------------------------------------------------------------------ errors


def test_undeclared_label_names_its_line(review_cfg, review_tsv):
    cfg = review_cfg(labels=["pos", "neg"])
    with pytest.raises(DataError, match=re.escape(f"{review_tsv}:2: label '1' is not one of data.labels")) as info:
        prepare_data(cfg, with_tokens=False)
    assert "(28 row(s) with undeclared labels" in str(info.value)
    assert not data_dir_for(cfg).exists()


def test_single_label_value_is_an_error(make_config, tmp_path, write_tsv):
    path = write_tsv(tmp_path / "one.tsv", [(f"text {i}", "1") for i in range(20)])
    with pytest.raises(DataError, match=r"only one label value \('1'\) in the data; need at least 2"):
        prepare_data(make_config({"path": str(path)}), with_tokens=False)


def test_nothing_left_after_curation(review_cfg, review_tsv):
    with pytest.raises(DataError, match=re.escape(f"{review_tsv}: no rows left after curation")):
        prepare_data(review_cfg(curation={"min_chars": 500}), with_tokens=False)


def test_a_class_too_rare_for_the_splits(make_config, tmp_path, write_tsv):
    rows = [(f"common text {i}", "a") for i in range(30)] + [("rare one", "b"), ("rare two", "b")]
    cfg = make_config({"path": str(write_tsv(tmp_path / "rare.tsv", rows))})
    with pytest.raises(DataError, match=r"the validation split has no rows of class 'b'"):
        prepare_data(cfg, with_tokens=False)
    assert not data_dir_for(cfg).exists()


def test_missing_source_file(make_config, tmp_path):
    cfg = make_config({"path": str(tmp_path / "absent.tsv")})
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'absent.tsv'}: file not found")):
        prepare_data(cfg, with_tokens=False)


# ----------------------------------------------------------------------------------- reuse and write-once


def test_rerun_reuses_and_leaves_the_test_split_alone(review_cfg):
    first = prepare_data(review_cfg(), with_tokens=False)
    test_file = first.data_dir / "test.parquet"
    before = (sha(test_file), test_file.stat().st_mtime_ns, test_file.stat().st_ino)
    manifest = (first.data_dir / "manifest.json").read_text()
    time.sleep(0.01)

    again = prepare_data(review_cfg(), with_tokens=False)
    assert again.reused is True
    assert again.replaced is None
    assert again.data_dir == first.data_dir
    assert again.report == json.loads(json.dumps(first.report))
    assert (sha(test_file), test_file.stat().st_mtime_ns, test_file.stat().st_ino) == before
    assert (first.data_dir / "manifest.json").read_text() == manifest


def test_tokenization_settings_do_not_invalidate_the_split(review_cfg):
    first = prepare_data(review_cfg(max_length=128), with_tokens=False)
    again = prepare_data(review_cfg(max_length=16, block_size=32), with_tokens=False)
    assert again.reused is True
    assert again.report["fingerprint"] == first.report["fingerprint"]


def test_a_test_split_read_does_not_spoil_reuse(review_cfg):
    first = prepare_data(review_cfg(), with_tokens=False)
    load_test_split(first.data_dir, reader="peek")
    assert prepare_data(review_cfg(), with_tokens=False).reused is True


@pytest.mark.parametrize(
    "change",
    [
        {"split": {"seed": 7, **SMALL_SPLIT}},
        {"split": {"validation": 0.25, "test": 0.25}},
        {"split": {"strategy": "random", **SMALL_SPLIT}},
        {"curation": {"dedupe": "exact"}},
        {"max_rows": 27},
    ],
    ids=["seed", "fractions", "strategy", "dedupe", "max_rows"],
)
def test_changed_split_settings_need_force(review_cfg, change):
    first = prepare_data(review_cfg(), with_tokens=False)
    old_sha = sha(first.data_dir / "test.parquet")
    changed = review_cfg(**change)

    with pytest.raises(DataError, match="holds a test split built from other data or settings") as info:
        prepare_data(changed, with_tokens=False)
    assert info.value.path == str(first.data_dir)
    assert "--force" in str(info.value)
    assert sha(first.data_dir / "test.parquet") == old_sha  # untouched

    rebuilt = prepare_data(changed, force=True, with_tokens=False)
    assert rebuilt.reused is False
    assert rebuilt.replaced is not None
    assert rebuilt.replaced.parent == first.data_dir.parent
    assert rebuilt.replaced.name.startswith("data.replaced-")
    assert sha(rebuilt.replaced / "test.parquet") == old_sha  # moved aside, not deleted
    assert json.loads((rebuilt.replaced / "manifest.json").read_text())["fingerprint"] == first.report["fingerprint"]
    assert rebuilt.report["fingerprint"] != first.report["fingerprint"]
    assert json.loads((rebuilt.data_dir / "manifest.json").read_text())["fingerprint"] == rebuilt.report["fingerprint"]
    # and the new build is reused from now on
    assert prepare_data(changed, with_tokens=False).reused is True


def test_changed_source_bytes_need_force(review_cfg, review_tsv):
    prepare_data(review_cfg(), with_tokens=False)
    with review_tsv.open("a") as fh:
        fh.write("a brand new film\t1\n")
    with pytest.raises(DataError, match="holds a test split"):
        prepare_data(review_cfg(), with_tokens=False)
    rebuilt = prepare_data(review_cfg(), force=True, with_tokens=False)
    assert rebuilt.report["source"]["rows_read"] == 29
    assert rebuilt.replaced is not None and rebuilt.replaced.is_dir()


def test_a_damaged_split_file_is_not_reused(review_cfg):
    first = prepare_data(review_cfg(), with_tokens=False)
    test_bytes = (first.data_dir / "test.parquet").read_bytes()
    train = first.data_dir / "train.parquet"
    train.write_bytes(train.read_bytes() + b"tampered")
    # same settings give the same deterministic split, so the damaged build is set aside and redone
    rebuilt = prepare_data(review_cfg(), with_tokens=False)
    assert rebuilt.reused is False
    assert (rebuilt.data_dir / "test.parquet").read_bytes() == test_bytes
    assert (rebuilt.replaced / "train.parquet").read_bytes().endswith(b"tampered")
    assert not (rebuilt.data_dir / "train.parquet").read_bytes().endswith(b"tampered")


def test_a_directory_without_test_split_is_rebuilt_without_force(review_cfg):
    cfg = review_cfg()
    leftover = data_dir_for(cfg)
    leftover.mkdir(parents=True)
    (leftover / "train.parquet").write_bytes(b"half written")
    prepared = prepare_data(cfg, with_tokens=False)
    assert prepared.replaced is None
    assert prepared.reused is False
    assert load_split(prepared.data_dir, "train").num_rows == 12
    assert not list(leftover.parent.glob("data.replaced-*"))


def test_a_build_without_its_report_is_not_treated_as_complete(review_cfg):
    first = prepare_data(review_cfg(), with_tokens=False)
    (first.data_dir / "data_report.json").unlink()
    try:
        again = prepare_data(review_cfg(), with_tokens=False)
    except DataError:
        return  # refusing with a clear message is acceptable
    assert again.report["splits"] == first.report["splits"]


def test_two_forced_rebuilds_in_the_same_second(review_cfg, monkeypatch):
    monkeypatch.setattr("raytune_ft.data.store.time.strftime", lambda fmt, *args: "20250101-120000")
    prepare_data(review_cfg(split={"seed": 1, **SMALL_SPLIT}), with_tokens=False)
    second = prepare_data(review_cfg(split={"seed": 2, **SMALL_SPLIT}), force=True, with_tokens=False)
    third = prepare_data(review_cfg(split={"seed": 3, **SMALL_SPLIT}), force=True, with_tokens=False)
    assert second.replaced.is_dir() and third.replaced.is_dir()
    assert second.replaced != third.replaced


# ------------------------------------------------------------------------------------- reading the splits


def test_load_split_refuses_the_test_split(review_cfg):
    prepared = prepare_data(review_cfg(), with_tokens=False)
    assert load_split(prepared.data_dir, "train").num_rows == 12
    assert load_split(str(prepared.data_dir), "validation").num_rows == 4
    with pytest.raises(ValueError, match="use load_test_split"):
        load_split(prepared.data_dir, "test")
    assert reads_of_test_split(prepared.data_dir) == []


def test_load_test_split_logs_every_read(review_cfg):
    prepared = prepare_data(review_cfg(), with_tokens=False)
    assert reads_of_test_split(prepared.data_dir) == []
    table = load_test_split(prepared.data_dir, reader="final-eval")
    assert table.num_rows == 4
    assert table.column("text").to_pylist() == texts_of(prepared.data_dir, "test")
    load_test_split(str(prepared.data_dir), reader="second look")
    reads = reads_of_test_split(prepared.data_dir)
    assert [r["reader"] for r in reads] == ["final-eval", "second look"]
    assert all({"time", "user", "host"} <= set(r) for r in reads)
    assert len((prepared.data_dir / "test_reads.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------------------------------------ causal LM


def write_corpus(path: Path, n: int) -> Path:
    paragraphs = [f"paragraph {i} first line\nparagraph {i} second line" for i in range(n)]
    paragraphs.insert(5, "Paragraph 2 first line\nparagraph 2 SECOND line!")  # a near-repeat
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def test_causal_lm_on_plain_text(make_config, tmp_path):
    path = write_corpus(tmp_path / "corpus.txt", 20)
    cfg = make_config({"path": str(path)}, task="causal-lm")
    prepared = prepare_data(cfg, with_tokens=False)
    report = prepared.report
    assert report["source"]["format"] == "text"
    assert report["source"]["rows_read"] == 21
    assert report["classes"] is None
    assert report["split"]["strategy"] == "contiguous"
    assert step_counts(report) == [
        ("drop_empty", 21, 21),
        ("dedupe_exact", 21, 21),
        ("dedupe_normalized", 21, 20),
    ]
    assert "repeats_with_conflicting_label" not in report["findings"]["normalized"]
    assert {n: report["splits"][n] for n in SPLITS} == {
        "train": {"rows": 16, "class_balance": None, "whole_rows": 16},  # no paragraph inside another
        "validation": {"rows": 2, "class_balance": None, "whole_rows": 2},
        "test": {"rows": 2, "class_balance": None, "whole_rows": 2},
    }
    train = load_split(prepared.data_dir, "train")
    assert train.column_names == ["text", "whole", "source_line"]
    test_lines = pq.read_table(prepared.data_dir / "test.parquet").column("source_line").to_pylist()
    val_lines = load_split(prepared.data_dir, "validation").column("source_line").to_pylist()
    train_lines = train.column("source_line").to_pylist()
    # contiguous: train comes first in the file, then validation, then test
    assert max(train_lines) < min(val_lines) <= max(val_lines) < min(test_lines)
    assert train.column("text").to_pylist()[0] == "paragraph 0 first line\nparagraph 0 second line"
    assert texts_of(prepared.data_dir, "test")[-1] == "paragraph 19 first line\nparagraph 19 second line"


# ---------------------------------------------------------------------------------------------- token report


def token_count(text: str) -> int:
    """Every word of the token fixtures is in the tiny vocabulary: one token per word plus [CLS] and [SEP]."""
    return len(text.split()) + 2


@pytest.fixture
def graded_tsv(tmp_path, write_tsv):
    rows = [(" ".join(["good"] * k + ["film"]), "1") for k in range(1, 11)]
    rows += [(" ".join(["bad"] * k + ["film"]), "0") for k in range(1, 11)]
    return write_tsv(tmp_path / "graded.tsv", rows)


def test_token_report_with_a_tiny_tokenizer(make_config, graded_tsv, tiny_tokenizer_dir):
    def cfg(max_length):
        data = {"path": str(graded_tsv), "split": {**SMALL_SPLIT, "overlap": NO_GROUPING}, "max_length": max_length}
        return make_config(data, model=str(tiny_tokenizer_dir))

    prepared = prepare_data(cfg(8), with_tokens=True)
    tokens = prepared.report["tokens"]
    assert tokens["settings"] == {"tokenizer": str(tiny_tokenizer_dir), "max_length": 8, "block_size": None}
    for name in SPLITS:
        lengths = sorted(token_count(t) for t in texts_of(prepared.data_dir, name))
        stats = tokens["splits"][name]
        assert stats["total"] == sum(lengths)
        assert stats["max"] == lengths[-1]
        assert stats["p50"] == lengths[len(lengths) // 2]
        assert stats["mean"] == round(sum(lengths) / len(lengths), 2)
        assert stats["truncated_rows"] == sum(n > 8 for n in lengths)
        assert stats["truncated_fraction"] == round(stats["truncated_rows"] / len(lengths), 4)
    total = sum(tokens["splits"][n]["total"] for n in SPLITS)
    assert total == sum(k + 3 for k in range(1, 11)) * 2
    assert sum(tokens["splits"][n]["truncated_rows"] for n in SPLITS) == 2 * 5  # k + 3 tokens: k = 6..10 exceed 8
    assert json.loads((prepared.data_dir / "data_report.json").read_text())["tokens"] == tokens

    # a new max_length keeps the split and only redoes the token report
    test_sha = sha(prepared.data_dir / "test.parquet")
    again = prepare_data(cfg(6), with_tokens=True)
    assert again.reused is True
    assert again.report["tokens"]["settings"]["max_length"] == 6
    assert sum(again.report["tokens"]["splits"][n]["truncated_rows"] for n in SPLITS) == 2 * 7  # k = 4..10 exceed 6
    assert json.loads((again.data_dir / "data_report.json").read_text())["tokens"]["settings"]["max_length"] == 6
    assert sha(again.data_dir / "test.parquet") == test_sha


def test_token_report_is_added_to_a_build_made_without_tokens(make_config, graded_tsv, tiny_tokenizer_dir):
    data = {"path": str(graded_tsv), "split": {**SMALL_SPLIT, "overlap": NO_GROUPING}}
    cfg = make_config(data, model=str(tiny_tokenizer_dir))
    first = prepare_data(cfg, with_tokens=False)
    assert "tokens" not in first.report
    again = prepare_data(cfg, with_tokens=True)
    assert again.reused is True
    assert again.report["tokens"]["settings"]["max_length"] == 128
    assert sum(again.report["tokens"]["splits"][n]["truncated_rows"] for n in SPLITS) == 0


def test_causal_lm_token_report_counts_blocks(make_config, tmp_path, tiny_tokenizer_dir):
    # twenty paragraphs of 2..21 words, the longer ones over two lines
    paragraphs = [" ".join(["good"] * (i + 1)) + ("\nthe film" if i % 2 else " film") for i in range(20)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    data = {"path": str(path), "block_size": 4, "split": {"overlap": NO_GROUPING}}
    cfg = make_config(data, task="causal-lm", model=str(tiny_tokenizer_dir))
    prepared = prepare_data(cfg, with_tokens=True)
    tokens = prepared.report["tokens"]
    assert tokens["settings"] == {"tokenizer": str(tiny_tokenizer_dir), "max_length": None, "block_size": 4}
    for name in SPLITS:
        stats = tokens["splits"][name]
        expected_total = sum(token_count(t) for t in texts_of(prepared.data_dir, name))
        assert stats["total"] == expected_total
        assert stats["blocks"] == expected_total // 4
        assert "truncated_rows" not in stats


# ------------------------------------------------------------------------------------------- real SST-2 file


def test_sst2_train_file(make_config):
    sst2 = shared_data("sst2", "train.tsv")
    cfg = make_config({"path": str(sst2), "columns": {"text": "sentence", "label": "label"}})
    prepared = prepare_data(cfg, with_tokens=False)
    report = prepared.report
    exact = report["findings"]["exact"]
    assert exact["repeated_rows"] == 371
    assert exact["repeats_with_conflicting_label"] == 5
    assert exact["texts_with_conflicting_labels"] == 5
    assert report["source"]["rows_read"] == 67349
    assert report["classes"] == ["0", "1"]

    rows_after_curation = report["steps"][-1]["rows_out"]
    assert report["steps"][-1]["name"] == "dedupe_normalized"
    assert sum(report["splits"][n]["rows"] for n in SPLITS) == rows_after_curation
    normalize = normalizer(cfg.data.curation.normalize)
    keys = {}
    total = 0
    for name in SPLITS:
        texts = texts_of(prepared.data_dir, name)
        total += len(texts)
        assert len(texts) == report["splits"][name]["rows"]
        for text in texts:
            assert keys.setdefault(normalize(text), name) == name, f"{text!r} is in {keys[normalize(text)]} and {name}"
    assert total == rows_after_curation == len(keys)  # disjoint, and no normalised text twice

    # a sentence and its phrases share a split: by text alone most test rows overlap a training row (inside one,
    # containing one of 3 words or more, or nearly repeating one); grouped, at most 1 %
    for name in ("validation", "test"):
        leak = report["leakage"][name]
        assert leak["without_grouping"]["any"]["share"] > 0.7, leak["without_grouping"]
        assert leak["after_grouping"]["inside_a_training_text"]["rows"] == 0
        assert leak["after_grouping"]["any"]["share"] <= 0.01, leak["after_grouping"]
    assert report["leakage"]["warnings"] == []
    # the whole sentences (no other row contains them) are marked in every split: about a tenth of SST-2's rows
    for name in SPLITS:
        whole = texts_of_column(prepared.data_dir, name, "whole")
        assert sum(whole) == report["splits"][name]["whole_rows"] and 0.05 < sum(whole) / len(whole) < 0.3
    assert report["split"]["grouping"]["largest_groups"][0] < 0.01 * rows_after_curation  # no chain of everything


def chat_rows(n: int) -> list[dict]:
    """N distinct conversations, some multi-turn, some with a system prompt."""
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        messages += [
            {"role": "user", "content": f"Is review number {i} about film {i * 7} positive?"},
            {"role": "assistant", "content": "yes" if i % 2 else "no"},
        ]
        if i % 4 == 0:
            messages += [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": f"Reason {i}."}]
        rows.append({"messages": messages, "kind": "follow-up" if i % 4 == 0 else "single"})
    return rows


def write_chat(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_conversations_are_split_as_units_and_bad_rows_leave_the_built_split_alone(make_config, tmp_path):
    """A conversation stays whole in one split (its turns as JSON, its slice and source line kept); a file that
    later holds bad rows is refused with every bad line named, and the data directory built before is untouched,
    even when a rebuild was forced (nothing moves aside before the new data has been read)."""
    source = write_chat(tmp_path / "chat.jsonl", chat_rows(60))
    cfg = make_config(
        {"path": str(source), "columns": {"slice": "kind"}, "split": {"validation": 0.2, "test": 0.2}}, task="chat"
    )
    built = prepare_data(cfg, with_tokens=False)
    report = built.report
    assert report["split"]["unit"] == "conversation" and report["split"]["strategy"] == "random"
    assert report["split"]["compared"] == "user turns"
    assert sum(report["splits"][name]["rows"] for name in SPLITS) == 60
    lines = []
    for name in SPLITS:
        table = pq.read_table(built.data_dir / f"{name}.parquet")
        lines += table.column("source_line").to_pylist()
        columns = [table.column(c).to_pylist() for c in ("messages", "source_line", "slice")]
        for text, line, kind in zip(*columns, strict=True):
            row = chat_rows(60)[line - 1]
            assert json.loads(text) == row["messages"] and kind == row["kind"]
    assert sorted(lines) == list(range(1, 61))  # every conversation in exactly one split, whole
    before = {p.name: sha(p) for p in built.data_dir.iterdir()}

    bad = chat_rows(60)
    bad[4]["messages"][0]["role"] = "moderator"
    bad[9]["messages"] = [{"role": "user", "content": "no answer"}]
    bad[20]["messages"][0]["content"] = 42
    write_chat(source, bad)
    with pytest.raises(DataError) as error:
        prepare_data(cfg, with_tokens=False, force=True)
    message = str(error.value)
    assert f"{source}:5:" in message
    assert "'moderator'" in message and "line 10" in message and "line 21" in message
    assert {p.name: sha(p) for p in built.data_dir.iterdir()} == before
    assert not list(built.data_dir.parent.glob("data.replaced-*"))


def test_chat_rendering_settings_keep_the_split(make_config, tmp_path):
    """data.chat (template, masking, length, packing) acts after the split: changing it reuses the test split."""
    from raytune_ft.data.pipeline import split_fingerprint

    source = write_chat(tmp_path / "chat.jsonl", chat_rows(10))
    plain = make_config({"path": str(source)}, task="chat")
    other = make_config(
        {"path": str(source), "chat": {"template": "chatml", "packing": True, "length_policy": "drop"}}, task="chat"
    )
    assert other.data.chat.template == "chatml"
    assert split_fingerprint(plain, "sha") == split_fingerprint(other, "sha")
