"""Shared fixtures for the data-pipeline unit tests: config building, small data files, a tiny tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from raytune_ft.config.loader import validate_raw
from raytune_ft.config.schema import ExperimentConfig
from raytune_ft.train.ds_config import deep_merge

# Ten distinct (after normalisation) texts per class; every word is in TINY_VOCAB so token counts are known.
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
POSITIVE = [f"a truly good film number {n}" for n in NUMBERS]
NEGATIVE = [f"a really bad film number {n}" for n in NUMBERS]

# The synthetic review set written by `review_tsv`, in file order (line 2 onwards). Known content:
#   * POSITIVE[0] three times (2 exact repeats, same label)
#   * NEGATIVE[0] once more as "A REALLY ... ONE!!" (a repeat after normalisation only, same label)
#   * "an odd film" with labels 1 and 0 (an exact conflict)
#   * "a mixed film" / "A MIXED FILM." with labels 1 and 0 (a conflict after normalisation only)
#   * one whitespace-only text
REVIEW_ROWS: list[tuple[str, str]] = [
    *[(text, "1") for text in POSITIVE],
    *[(text, "0") for text in NEGATIVE],
    (POSITIVE[0], "1"),
    (POSITIVE[0], "1"),
    (NEGATIVE[0].upper() + "!!", "0"),
    ("an odd film", "1"),
    ("an odd film", "0"),
    ("a mixed film", "1"),
    ("A MIXED FILM.", "0"),
    ("   ", "1"),
]

TINY_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *"a truly good film number really bad the movie was plot is an odd mixed".split(),
    *NUMBERS,
    *".,!?",
]


def write_tsv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> Path:
    lines = ["\t".join(header)] + [f"{text}\t{label}" for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., ExperimentConfig]:
    """Build a validated ExperimentConfig whose output_dir is inside tmp_path.

    `data` is merged into the defaults; `model` entries override the model section; other keyword
    arguments are top-level keys.
    """

    def build(
        data: dict[str, Any], *, task: str = "sequence-classification", model: str = "bert-base-uncased", **top: Any
    ) -> ExperimentConfig:
        raw: dict[str, Any] = {
            "name": "exp",
            "output_dir": str(tmp_path / "runs"),
            "model": {"name_or_path": model, "task": task},
            "data": data,
        }
        raw = deep_merge(raw, top)
        return validate_raw(raw, None, "test.yaml", [], base_dir=tmp_path)

    return build


@pytest.fixture
def review_rows() -> list[tuple[str, str]]:
    return list(REVIEW_ROWS)


@pytest.fixture
def positive_texts() -> list[str]:
    return list(POSITIVE)


@pytest.fixture
def negative_texts() -> list[str]:
    return list(NEGATIVE)


@pytest.fixture(name="write_tsv")
def write_tsv_fixture() -> Callable[..., Path]:
    """The `write_tsv(path, rows, header=("text", "label"))` helper, for tests that need their own file."""
    return write_tsv


@pytest.fixture
def review_tsv(tmp_path: Path) -> Path:
    return write_tsv(tmp_path / "reviews.tsv", REVIEW_ROWS)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT tokenizer plus config.json, a directory load_tokenizer accepts like any checkpoint."""
    from transformers import BertConfig, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert-tokenizer")
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    # transformers 5 takes the vocabulary as `vocab` (a dict or a vocab.txt path); a dict works everywhere.
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(TINY_VOCAB)})
    tokenizer.save_pretrained(folder)
    BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    ).save_pretrained(folder)
    return folder
