"""jobs/build_chat_data.py, the example chat data builder, run as a script on a slice of the real SST-2 and tiny
Shakespeare files: OpenAI-format JSONL, the same bytes for a seed, roles in order, answers that follow from the
labels, every SST-2 sentence in exactly one conversation, Shakespeare answers that are the lines that follow, and
the `review` (split text) and `kind` (slice) columns beside the messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from shared_data import shared_data

SCRIPT = Path(__file__).resolve().parents[2] / "jobs" / "build_chat_data.py"
SST2_ROWS = 400  # data rows of the slice
SHAKESPEARE_CHARS = 30_000
LABEL_WORDS = ("negative", "positive")


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("chat_slices")
    sst2 = folder / "train.tsv"
    lines = shared_data("sst2", "train.tsv").read_text(encoding="utf-8").splitlines()[: SST2_ROWS + 1]
    sst2.write_text("\n".join(lines) + "\n", encoding="utf-8")
    shakespeare = folder / "input.txt"
    text = shared_data("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:SHAKESPEARE_CHARS]
    shakespeare.write_text(text, encoding="utf-8")
    return sst2, shakespeare


def run(out: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def build(tmp_path: Path, slices: tuple[Path, Path], name: str, *args: str) -> tuple[bytes, list[dict]]:
    sst2, shakespeare = slices
    out = tmp_path / name
    run(out, "--sst2", str(sst2), "--shakespeare", str(shakespeare), *args)
    data = out.read_bytes()
    return data, [json.loads(line) for line in data.decode("utf-8").splitlines()]


def sst2_rows(path: Path) -> list[tuple[int, str]]:
    return [
        (int(label), sentence.strip())
        for label, sentence in (line.split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines()[1:])
    ]


def check_roles(messages: list[dict]) -> None:
    roles = [m["role"] for m in messages]
    if roles[0] == "system":
        roles = roles[1:]
    assert roles and len(roles) % 2 == 0, roles
    assert roles == ["user", "assistant"] * (len(roles) // 2), roles


def follow_up_answer(question: str, label: int) -> str | None:
    """What the answer to a follow-up must be (None: it must name the label)."""
    expected = {
        "Answer in one word: is it positive?": "Yes" if label == 1 else "No",
        "Answer in one word: is it negative?": "Yes" if label == 0 else "No",
        "Give the label as a number: 1 for positive, 0 for negative.": str(label),
        "Why?": None,
    }
    assert question in expected, f"a follow-up this test does not know: {question!r}"
    return expected[question]


def test_shape_roles_and_answers(tmp_path: Path, slices: tuple[Path, Path]) -> None:
    _, conversations = build(tmp_path, slices, "all.jsonl", "--seed", "1", "--shakespeare-share", "0.2")
    rows = sst2_rows(slices[0])
    source_lines = slices[1].read_text(encoding="utf-8").splitlines()
    sources = Counter(c["meta"]["source"] for c in conversations)
    assert sources["sst2"] == len({text for _, text in rows}) == SST2_ROWS  # the slice repeats no sentence
    assert 0 < sources["shakespeare"] and set(sources) == {"sst2", "shakespeare"}
    assert any(c["messages"][0]["role"] == "system" for c in conversations)
    assert any(c["messages"][0]["role"] != "system" for c in conversations)

    seen_sentences: Counter[str] = Counter()
    shakespeare_lines: list[range] = []
    follow_ups = 0
    kinds: Counter[str] = Counter()
    for conversation in conversations:
        assert list(conversation) == ["messages", "review", "kind", "meta"]
        kinds[conversation["kind"]] += 1
        messages = conversation["messages"]
        for message in messages:
            assert set(message) == {"role", "content"}
            assert isinstance(message["content"], str) and message["content"].strip()
        check_roles(messages)
        turns = [m for m in messages if m["role"] != "system"]
        meta = conversation["meta"]
        if meta["source"] == "sst2":
            label, text = rows[meta["row"]]
            assert meta["label"] == label
            assert text in turns[0]["content"] and turns[0]["content"].startswith(("What is", "Is this", "Classify"))
            assert turns[1]["content"] == LABEL_WORDS[label]
            # the bare sentence, so the overlap-aware split sees a phrase inside the sentence it was cut from
            assert conversation["review"] == text
            assert conversation["kind"] == ("sentiment-follow-up" if len(turns) > 2 else "sentiment")
            seen_sentences[text] += 1
            if len(turns) > 2:
                assert len(turns) == 4
                follow_ups += 1
                expected = follow_up_answer(turns[2]["content"], label)
                if expected is None:
                    assert LABEL_WORDS[label] in turns[3]["content"]
                    assert LABEL_WORDS[1 - label] not in turns[3]["content"]
                else:
                    assert turns[3]["content"] == expected
        else:
            line, prompt_lines, answer_lines = meta["line"], meta["prompt_lines"], meta["answer_lines"]
            assert len(turns) == 2 and turns[0]["content"].startswith("Continue this passage")
            prompt = "\n".join(source_lines[line : line + prompt_lines]).strip("\n")
            answer = "\n".join(source_lines[line + prompt_lines : line + prompt_lines + answer_lines]).strip("\n")
            assert turns[0]["content"].endswith("\n\n" + prompt)
            assert turns[1]["content"] == answer
            assert conversation["review"] == prompt and conversation["kind"] == "continuation"
            shakespeare_lines.append(range(line, line + prompt_lines + answer_lines))
    assert follow_ups > 0
    assert kinds["sentiment-follow-up"] == follow_ups
    assert kinds["sentiment"] == sources["sst2"] - follow_ups and kinds["continuation"] == sources["shakespeare"]
    assert set(seen_sentences.values()) == {1}  # no sentence in two conversations
    covered = [line for lines in shakespeare_lines for line in lines]
    assert len(covered) == len(set(covered))  # no Shakespeare line in two conversations


def test_same_seed_same_bytes(tmp_path: Path, slices: tuple[Path, Path]) -> None:
    first, _ = build(tmp_path, slices, "a.jsonl", "--seed", "7", "--rows", "120")
    second, _ = build(tmp_path, slices, "b.jsonl", "--seed", "7", "--rows", "120")
    other, _ = build(tmp_path, slices, "c.jsonl", "--seed", "8", "--rows", "120")
    assert first == second
    assert first != other


def test_rows_and_share(tmp_path: Path, slices: tuple[Path, Path]) -> None:
    _, conversations = build(tmp_path, slices, "n.jsonl", "--rows", "50", "--shakespeare-share", "0.3")
    sources = Counter(c["meta"]["source"] for c in conversations)
    assert sources == {"sst2": 35, "shakespeare": 15}
    _, only_sst2 = build(tmp_path, slices, "s.jsonl", "--rows", "30", "--shakespeare-share", "0")
    assert {c["meta"]["source"] for c in only_sst2} == {"sst2"} and len(only_sst2) == 30
    result = run(
        tmp_path / "x.jsonl", "--sst2", str(slices[0]), "--rows", "1000", "--shakespeare-share", "0", check=False
    )
    assert result.returncode != 0 and "needs 1000 SST-2 sentences" in result.stderr


def test_repeated_sentences(tmp_path: Path, slices: tuple[Path, Path]) -> None:
    """A sentence the file repeats with its label goes in once, the later rows named; one it repeats with both
    labels has no answer to give and is left out."""
    rows = sst2_rows(slices[0])
    sst2 = tmp_path / "dups.tsv"
    (same_label, same_text), (other_label, other_text) = rows[3], rows[5]
    extra = [f"{same_label}\t{same_text} ", f"{1 - other_label}\t{other_text}"]
    sst2.write_text(slices[0].read_text(encoding="utf-8") + "\n".join(extra) + "\n", encoding="utf-8")
    out = tmp_path / "dups.jsonl"
    result = run(out, "--sst2", str(sst2), "--shakespeare-share", "0")
    conversations = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    by_row = {c["meta"]["row"]: c for c in conversations}
    assert len(conversations) == SST2_ROWS - 1
    assert by_row[3]["meta"]["duplicate_rows"] == [SST2_ROWS]
    assert 5 not in by_row and SST2_ROWS + 1 not in by_row
    assert '"sst2_conflicting_left_out": 1' in result.stderr


def test_env_default_path(tmp_path: Path, slices: tuple[Path, Path]) -> None:
    """Like the jobs' YAML, SST2_PATH (and SHAKESPEARE_PATH) stand in for the default paths."""
    out = tmp_path / "env.jsonl"
    env = {"SST2_PATH": str(slices[0]), "SHAKESPEARE_PATH": str(slices[1])}
    run(out, "--rows", "20", "--shakespeare-share", "0.25", env=env)
    conversations = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert all(c["meta"]["row"] < SST2_ROWS for c in conversations if c["meta"]["source"] == "sst2")
    assert all(c["meta"]["line"] < 1500 for c in conversations if c["meta"]["source"] == "shakespeare")
