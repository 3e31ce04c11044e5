"""Readers: every format into one Records shape, format detection, and errors that name the file and line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytune_ft.data.readers import DataError, Records, detect_format, label_text, read_records


def write(path: Path, content: bytes | str | dict[str, list[Any]]) -> Path:
    """bytes/str are written as-is; a dict of columns is written as a Parquet table."""
    if isinstance(content, dict):
        pq.write_table(pa.table(content), path)
    elif isinstance(content, str):
        path.write_bytes(content.encode("utf-8"))
    else:
        path.write_bytes(content)
    return path


# ---------------------------------------------------------------------------------------------- happy paths


def test_tsv_is_read_without_quote_handling(tmp_path):
    # SST-2 style: quotes are part of the sentence, even at the start of a field and unbalanced.
    path = write(
        tmp_path / "d.tsv",
        'label\tsentence\n1\t"quoted" start of a sentence\n0\tit \'s a "half quoted film\n\n1\t  padded  \n',
    )
    records = read_records(path, "auto", "sentence", "label")
    assert records.texts == ['"quoted" start of a sentence', "it 's a \"half quoted film", "  padded  "]
    assert records.labels == ["1", "0", "1"]
    # the blank line 4 is skipped but still counted, so the last record is on line 5
    assert records.rows == [2, 3, 5]


def test_tsv_with_crlf_line_endings_and_extra_columns(tmp_path):
    path = write(tmp_path / "d.tsv", b"id\ttext\tlabel \r\n7\tfirst\t pos \r\n8\tsecond\tneg\r\n")
    records = read_records(path, "tsv", "text", "label")
    # header names and label values are stripped; text is kept verbatim
    assert records.texts == ["first", "second"]
    assert records.labels == ["pos", "neg"]
    assert records.rows == [2, 3]


def test_tsv_with_utf8_bom_and_no_label_column(tmp_path):
    path = write(tmp_path / "d.tsv", "\ufefftext\tlabel\ncafé crème\t1\n".encode())
    records = read_records(path, "auto", "text", None)
    assert records.texts == ["café crème"]
    assert records.labels is None


@pytest.mark.parametrize("suffix", ["tsv", "csv"])
def test_delimited_files_split_records_on_newlines_only(tmp_path, suffix):
    sep = "\t" if suffix == "tsv" else ","
    path = write(tmp_path / f"d.{suffix}", f"text{sep}label\na\u2028b\x85c\x0bd{sep}1\nnext{sep}0\n")
    records = read_records(path, "auto", "text", "label")
    assert records.texts == ["a\u2028b\x85c\x0bd", "next"]
    assert records.rows == [2, 3]


def test_csv_honours_quoting(tmp_path):
    path = write(
        tmp_path / "d.csv",
        'text,label\n"hello, world",1\n"she said ""wow""",0\nplain,1\n"two\nlines",0\n',
    )
    records = read_records(path, "auto", "text", "label")
    assert records.texts == ["hello, world", 'she said "wow"', "plain", "two\nlines"]
    assert records.labels == ["1", "0", "1", "0"]
    assert records.rows[:3] == [2, 3, 4]


def test_jsonl_reads_objects_and_spells_labels_one_way(tmp_path):
    lines = [
        {"text": "int label", "label": 1, "extra": [1, 2]},
        {"text": "float label", "label": 0.0},
        {"text": "string label", "label": " 1 "},
        {"text": "bool label", "label": True},
        {"text": "real float", "label": 0.5},
    ]
    body = "\n".join(json.dumps(obj) for obj in lines[:2]) + "\n\n" + "\n".join(json.dumps(o) for o in lines[2:])
    path = write(tmp_path / "d.jsonl", body + "\n")
    records = read_records(path, "auto", "text", "label")
    assert records.texts == ["int label", "float label", "string label", "bool label", "real float"]
    assert records.labels == ["1", "0", "1", "true", "0.5"]
    assert records.rows == [1, 2, 4, 5, 6]  # line 3 is blank


def test_jsonl_without_labels_ignores_label_key(tmp_path):
    path = write(tmp_path / "d.ndjson", '{"body": "x", "label": null}\n{"body": "y"}\n')
    records = read_records(path, "auto", "body", None)
    assert records.texts == ["x", "y"]
    assert records.labels is None


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([1, 0, 1], ["1", "0", "1"]),
        ([1.0, 0.0, 2.0], ["1", "0", "2"]),
        (["pos", "neg", " pos "], ["pos", "neg", "pos"]),
        ([True, False, True], ["true", "false", "true"]),
    ],
    ids=["int", "float", "string", "bool"],
)
def test_parquet_labels(tmp_path, labels, expected):
    path = write(tmp_path / "d.parquet", {"text": ["a", "b", "c"], "label": labels, "other": [9, 9, 9]})
    records = read_records(path, "auto", "text", "label")
    assert records.texts == ["a", "b", "c"]
    assert records.labels == expected
    assert records.rows == [1, 2, 3]


def test_plain_text_is_one_record_per_paragraph_with_its_first_line(tmp_path):
    # blank lines may hold spaces or tabs; runs of blank lines are one break
    text = "\n\nfirst paragraph\nstill first\n\n\nsecond\n \t \n\nthird one\n  indented line\n\n"
    path = write(tmp_path / "corpus.txt", text)
    records = read_records(path, "auto", "text", None)
    assert records.texts == ["first paragraph\nstill first", "second", "third one\n  indented line"]
    assert records.rows == [3, 7, 10]
    assert records.labels is None


def test_records_take_keeps_texts_labels_and_rows_aligned():
    records = Records(["a", "b", "c"], ["x", "y", "z"], [2, 3, 4])
    taken = records.take([2, 0])
    assert (taken.texts, taken.labels, taken.rows) == (["c", "a"], ["z", "x"], [4, 2])
    assert len(taken) == 2
    assert Records(["a"], None, [1]).take([0]).labels is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, "1"), (1.0, "1"), ("1", "1"), (" 1 ", "1"), (2.5, "2.5"), (True, "true"), (False, "false"), (-3.0, "-3")],
)
def test_label_text(value, expected):
    assert label_text(value) == expected


# ----------------------------------------------------------------------------------------- format detection


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.tsv", "tsv"),
        ("a.csv", "csv"),
        ("a.jsonl", "jsonl"),
        ("a.ndjson", "jsonl"),
        ("a.parquet", "parquet"),
        ("a.pq", "parquet"),
        ("a.txt", "text"),
        ("a.text", "text"),
        ("UPPER.TSV", "tsv"),
        ("archive.v2.Csv", "csv"),
    ],
)
def test_detect_format_from_suffix(name, fmt):
    assert detect_format(Path(name), "auto") == fmt


def test_declared_format_wins_over_suffix(tmp_path):
    assert detect_format(Path("data.csv"), "tsv") == "tsv"
    path = write(tmp_path / "data.dat", "text\tlabel\nhello, world\t1\n")
    assert read_records(path, "tsv", "text", "label").texts == ["hello, world"]


@pytest.mark.parametrize("name", ["data.dat", "data", "data.json"])
def test_unknown_suffix_asks_for_data_format(tmp_path, name):
    path = write(tmp_path / name, "text\tlabel\nx\t1\n")
    with pytest.raises(DataError, match=r"cannot tell the format from suffix .*set data\.format") as info:
        read_records(path, "auto", "text", "label")
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")


# ---------------------------------------------------------------------------------------------------- errors

BAD_INPUTS = [
    # id, file name, content, text column, label column, expected line (None: no line), message pattern
    ("empty-tsv", "d.tsv", b"", "text", "label", None, "file is empty"),
    ("blank-jsonl", "d.jsonl", b"\n  \n\n", "text", "label", None, "file is empty"),
    ("empty-text", "d.txt", b"", "text", None, None, "file is empty"),
    ("empty-parquet-bytes", "d.parquet", b"", "text", "label", None, "not a readable Parquet file"),
    ("corrupt-parquet", "d.parquet", b"PAR1 not really parquet", "text", "label", None, "not a readable Parquet"),
    ("header-only-tsv", "d.tsv", b"text\tlabel\n", "text", "label", None, "has no data rows"),
    ("header-only-csv", "d.csv", b"text,label\n\n", "text", "label", None, "has no data rows"),
    (
        "no-rows-parquet",
        "d.parquet",
        {"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())},
        "text",
        "label",
        None,
        "has no data rows",
    ),
    (
        "tsv-missing-text",
        "d.tsv",
        b"sentence\tlabel\nx\t1\n",
        "text",
        "label",
        1,
        r"no text column 'text' \(columns: sentence, label\); set data\.columns\.text",
    ),
    (
        "tsv-missing-label",
        "d.tsv",
        b"text\ty\nx\t1\n",
        "text",
        "label",
        1,
        r"no label column 'label' \(columns: text, y\); set data\.columns\.label",
    ),
    ("csv-missing-label", "d.csv", b"text,polarity\nx,1\n", "text", "label", 1, r"no label column 'label'"),
    (
        "jsonl-missing-text",
        "d.jsonl",
        b'{"text": "ok", "label": 1}\n{"body": "x", "label": 0}\n',
        "text",
        "label",
        2,
        r"no text column 'text' \(columns: body, label\)",
    ),
    (
        "jsonl-missing-label",
        "d.jsonl",
        b'{"text": "a", "label": 1}\n\n{"text": "b", "y": 0}\n',
        "text",
        "label",
        3,
        r"no label column 'label' \(columns: text, y\)",
    ),
    (
        "parquet-missing-text",
        "d.parquet",
        {"sentence": ["a"], "label": [1]},
        "text",
        "label",
        None,
        r"no text column 'text' \(columns: sentence, label\)",
    ),
    (
        "parquet-missing-label",
        "d.parquet",
        {"text": ["a"], "y": [1]},
        "text",
        "label",
        None,
        r"no label column 'label' \(columns: text, y\)",
    ),
    (
        "non-utf8-tsv",
        "d.tsv",
        b"text\tlabel\nfine\t1\nb\xffd\t0\n",
        "text",
        "label",
        3,
        r"invalid UTF-8 byte 0xff at column 2; save the file as UTF-8",
    ),
    (
        "non-utf8-latin1-jsonl",
        "d.jsonl",
        '{"text": "ok", "label": 1}\n{"text": "café", "label": 0}\n'.encode("latin-1"),
        "text",
        "label",
        2,
        r"invalid UTF-8 byte 0xe9 at column 14",
    ),
    ("non-utf8-text", "d.txt", b"one\n\ntwo \x80\n", "text", None, 3, r"invalid UTF-8 byte 0x80 at column 5"),
    (
        "tsv-too-many-fields",
        "d.tsv",
        b"text\tlabel\na\t1\nb\twith\ttab\t0\n",
        "text",
        "label",
        3,
        r"expected 2 fields like the header, found 4",
    ),
    (
        "tsv-too-few-fields",
        "d.tsv",
        b"text\tlabel\na\t1\n\nno label here\n",
        "text",
        "label",
        4,
        r"expected 2 fields like the header, found 1",
    ),
    (
        "csv-too-many-fields",
        "d.csv",
        b'text,label\n"a, b",1\nc,d,0\n',
        "text",
        "label",
        3,
        r"expected 2 fields like the header, found 3",
    ),
    ("tsv-empty-label", "d.tsv", b"text\tlabel\na\t1\nb\t  \n", "text", "label", 3, r"empty label in column 'label'"),
    (
        "invalid-json",
        "d.jsonl",
        b'{"text": "a", "label": 1}\n{"text": "b", "label": 0\n',
        "text",
        "label",
        2,
        r"invalid JSON at column \d+: ",
    ),
    (
        "json-not-object",
        "d.jsonl",
        b'{"text": "a", "label": 1}\n["b", 0]\n',
        "text",
        "label",
        2,
        r"expected a JSON object per line, got list",
    ),
    (
        "json-text-not-string",
        "d.jsonl",
        b'{"text": 5, "label": 1}\n',
        "text",
        "label",
        1,
        r"'text' must be a string, got int",
    ),
    (
        "json-null-label",
        "d.jsonl",
        b'{"text": "a", "label": 1}\n{"text": "b", "label": null}\n',
        "text",
        "label",
        2,
        r"'label' must be a single value, got None",
    ),
    (
        "json-list-label",
        "d.jsonl",
        b'{"text": "a", "label": [1, 0]}\n',
        "text",
        "label",
        1,
        r"'label' must be a single value, got \[1, 0\]",
    ),
    (
        "parquet-null-label",
        "d.parquet",
        {"text": ["a", "b", "c"], "label": [1, 0, None]},
        "text",
        "label",
        3,
        r"row 3: 'label' is null",
    ),
    (
        "parquet-null-text",
        "d.parquet",
        {"text": ["a", None], "label": [1, 0]},
        "text",
        "label",
        2,
        r"row 2: 'text' must be a string, got None",
    ),
    (
        "parquet-int-text",
        "d.parquet",
        {"text": [1, 2], "label": [1, 0]},
        "text",
        "label",
        1,
        r"row 1: 'text' must be a string, got 1",
    ),
    (
        "text-with-label-column",
        "d.txt",
        b"a paragraph\n",
        "text",
        "label",
        None,
        r"plain text has no labels; sequence-classification needs tsv, csv, jsonl or parquet",
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "text_column", "label_column", "line", "pattern"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_names_file_and_line(tmp_path, name, content, text_column, label_column, line, pattern):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=pattern) as info:
        read_records(path, "auto", text_column, label_column)
    err = info.value
    assert err.path == str(path)
    assert err.line == line
    prefix = f"{path}:{line}: " if line else f"{path}: "
    assert str(err).startswith(prefix), str(err)


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(DataError, match=re.escape(f"{missing}: file not found")) as info:
        read_records(missing, "auto", "text", "label")
    assert info.value.line is None
    folder = tmp_path / "folder.tsv"
    folder.mkdir()
    with pytest.raises(DataError, match=re.escape(f"{folder}: is not a file")):
        read_records(folder, "auto", "text", "label")


def test_missing_file_is_reported_before_the_format_check(tmp_path):
    # an unknown suffix on a path that does not exist: the user first needs to know the file is missing
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "missing.xyz", "auto", "text", "label")


def test_data_error_is_a_value_error_with_location():
    err = DataError("f.tsv", 7, "boom")
    assert isinstance(err, ValueError)
    assert str(err) == "f.tsv:7: boom"
    assert str(DataError(Path("f.tsv"), None, "boom")) == "f.tsv: boom"


# ------------------------------------------------------------------------ regressions (bugs found and fixed)


def test_non_utf8_after_bom_reports_the_right_line(tmp_path):
    path = write(tmp_path / "d.tsv", b"\xef\xbb\xbftext\tlabel\nab\t1\nc\xffd\t0\n")
    with pytest.raises(DataError) as info:
        read_records(path, "auto", "text", "label")
    assert info.value.line == 3
    assert "invalid UTF-8 byte 0xff at column 2" in str(info.value)


def test_plain_text_with_crlf_line_endings_splits_paragraphs(tmp_path):
    path = write(tmp_path / "corpus.txt", b"para one\r\nline two\r\n\r\npara two\r\n")
    records = read_records(path, "auto", "text", None)
    assert len(records) == 2
    assert records.texts[0].replace("\r\n", "\n") == "para one\nline two"
    assert records.texts[1] == "para two"
    assert records.rows == [1, 4]


def test_plain_text_with_two_whitespace_only_lines_between_paragraphs(tmp_path):
    path = write(tmp_path / "corpus.txt", "first\n   \n\t\nsecond\n")
    records = read_records(path, "auto", "text", None)
    assert records.texts == ["first", "second"]
    assert records.rows == [1, 4]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"], ids=["U+2028", "U+2029", "U+0085"])
def test_jsonl_with_unicode_line_separator_inside_a_string(tmp_path, separator):
    rows = [{"text": f"first{separator}part", "label": 1}, {"text": "second", "label": 0}]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    records = read_records(path, "auto", "text", "label")
    assert records.texts == [f"first{separator}part", "second"]
    assert records.rows == [1, 2]


def test_csv_multiline_record_keeps_its_first_line(tmp_path):
    path = write(tmp_path / "d.csv", 'text,label\n"two\nlines",1\nnext,0\n')
    records = read_records(path, "auto", "text", "label")
    assert records.rows == [2, 4]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("d.tsv", b"text\tlabel\tsource\ngood film\t1\tweb\nbad film\t0\tprint\n"),
        ("d.csv", b'text,label,source\n"good film",1,web\n"bad film",0,print\n'),
        (
            "d.jsonl",
            b'{"text": "good film", "label": 1, "source": "web"}\n'
            b'{"text": "bad film", "label": 0, "source": "print"}\n',
        ),
    ],
)
def test_slice_column_is_read_beside_text_and_label(tmp_path, name, content):
    path = write(tmp_path / name, content)
    records = read_records(path, "auto", "text", "label", "source")
    assert records.slices == ["web", "print"]
    assert records.take([1]).slices == ["print"]
    with pytest.raises(DataError, match="no slice column 'group'"):
        read_records(path, "auto", "text", "label", "group")


def test_slice_column_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [1, 0], "source": ["web", None]}), path)
    assert read_records(path, "auto", "text", "label", "source").slices == ["web", ""]
