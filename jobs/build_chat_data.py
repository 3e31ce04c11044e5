#!/usr/bin/env python3
"""Build an example chat data set (OpenAI-format JSONL) from the real data beside the project.

Each output line is one conversation:

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...], "review": "...", "kind": "...",
     "meta": {...}}

``review`` is the text the conversation is about, with no template around it: the SST-2 sentence, or the Shakespeare
passage of the prompt. It is the column to give the project's overlap-aware split (``data.columns.split_text:
review``): SST-2's phrases are cut from its own sentences, and a phrase and the sentence that contains it must land in
one split, which the question template around them in ``messages`` would hide. ``kind`` is ``"sentiment"`` (SST-2,
one turn), ``"sentiment-follow-up"`` (SST-2 with a follow-up turn) or ``"continuation"`` (Shakespeare): the column to
slice the evaluation by.

Two sources:

- SST-2 (``sst2/train.tsv``, header ``label<TAB>sentence``): "What is the sentiment of this review? ..." answered
  "positive" or "negative", some conversations with one follow-up turn whose answer follows from the label alone
  ("Answer in one word: is it positive?" -> "Yes"/"No", the label as a number, "Why?"), some with a system prompt.
  ``meta`` is ``{"source": "sst2", "row": N, "label": 0|1}``: N is the 0-based data row of the file (the header
  is not a row), the index pandas would give. Every sentence is in exactly one conversation: a sentence the file
  repeats is written once, from its first row, with the later rows in ``meta.duplicate_rows``; a sentence the file
  repeats with both labels has no derivable answer and is left out (counted on stderr). SST-2's rows are phrases
  cut from its own sentences, so conversations still overlap by text: split them with the project's overlap-aware
  split on ``review``, not at random.
- tiny Shakespeare (``tinyshakespeare/input.txt``): "Continue this passage: ..." answered with the lines that follow
  it. Windows of lines never overlap; ``meta`` is ``{"source": "shakespeare", "line": first line (0-based),
  "prompt_lines": P, "answer_lines": A}``.

Defaults read ../shared/data beside the project root; SST2_PATH and SHAKESPEARE_PATH override them, as in the jobs'
YAML, and --sst2/--shakespeare override both. The output is the same bytes for the same inputs and --seed.

    python jobs/build_chat_data.py --out /tmp/chat.jsonl --rows 2000 --shakespeare-share 0.1 --seed 0

A script only: the raytune_ft package neither imports it nor reads ../shared/data. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_SST2 = SHARED_DATA / "sst2" / "train.tsv"
DEFAULT_SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"

LABEL_WORDS = ("negative", "positive")  # SST-2: 0 = negative, 1 = positive

# First user turn: each carries the review; the answer is the label word.
SST2_QUESTIONS = (
    "What is the sentiment of this review? {text}",
    "What is the sentiment of this review?\n\n{text}",
    "Is this movie review positive or negative?\n\n{text}",
    "Classify the sentiment of the following movie review as positive or negative.\nReview: {text}",
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a sentiment classifier for movie reviews. Answer with one word: positive or negative.",
    "You are a concise assistant. Keep answers short.",
)
SHAKESPEARE_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You continue passages of Shakespeare in the same style.",
)


def _yes_no(truth: bool) -> str:
    """The one-word answer to a yes/no follow-up."""
    return "Yes" if truth else "No"


# Follow-up turns: (question, answer from the label). No answer states a fact the label does not give.
FOLLOW_UPS: tuple[tuple[str, Any], ...] = (
    ("Answer in one word: is it positive?", lambda label: _yes_no(label == 1)),
    ("Answer in one word: is it negative?", lambda label: _yes_no(label == 0)),
    ("Give the label as a number: 1 for positive, 0 for negative.", lambda label: str(label)),
    (
        "Why?",
        lambda label: (
            f"The review expresses a {'favourable' if label == 1 else 'unfavourable'} opinion of the film, "
            f"so its sentiment is {LABEL_WORDS[label]}."
        ),
    ),
)

SHAKESPEARE_QUESTIONS = (
    "Continue this passage:\n\n{text}",
    "Continue this passage from Shakespeare:\n\n{text}",
)


@dataclass(frozen=True)
class Sentence:
    """One distinct SST-2 sentence: its first data row, its label, and the later rows that repeat it."""

    row: int
    label: int
    text: str
    duplicate_rows: tuple[int, ...] = ()


@dataclass(frozen=True)
class Passage:
    """One Shakespeare window: its first line (0-based), the lines to continue, and the lines that follow them."""

    line: int
    prompt: str
    answer: str
    prompt_lines: int
    answer_lines: int


def read_sst2(path: Path) -> tuple[list[Sentence], int]:
    """The file's sentences, each once (first row, later same-label rows as duplicates), in row order; and how many
    sentences were left out because the file gives them both labels."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip().split("\t") != ["label", "sentence"]:
        raise SystemExit(f"{path}: expected the header 'label<TAB>sentence'")
    first: dict[str, tuple[int, int]] = {}
    dups: dict[str, list[int]] = {}
    conflicting: set[str] = set()
    for row, line in enumerate(lines[1:]):
        if not line.strip():
            continue
        label_text, sep, sentence = line.partition("\t")
        text = sentence.strip()
        if not sep or label_text.strip() not in ("0", "1") or not text:
            raise SystemExit(f"{path}:{row + 2}: expected '0|1<TAB>sentence', got {line!r}")
        label = int(label_text)
        if text in first:
            if first[text][1] != label:
                conflicting.add(text)
            dups.setdefault(text, []).append(row)
        else:
            first[text] = (row, label)
    sentences = [
        Sentence(row, label, text, tuple(dups.get(text, ())))
        for text, (row, label) in first.items()
        if text not in conflicting
    ]
    return sentences, len(conflicting)


def read_passages(path: Path, rng: random.Random) -> list[Passage]:
    """Consecutive, non-overlapping windows of the text: a few lines to continue and the lines that follow them.
    Window sizes are drawn from rng; a window whose prompt or answer is blank is skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    passages: list[Passage] = []
    start = 0
    while start < len(lines):
        prompt_lines, answer_lines = rng.randint(2, 6), rng.randint(1, 4)
        end = start + prompt_lines + answer_lines
        if end > len(lines):
            break
        prompt = "\n".join(lines[start : start + prompt_lines]).strip("\n")
        answer = "\n".join(lines[start + prompt_lines : end]).strip("\n")
        if prompt.strip() and answer.strip():
            passages.append(Passage(start, prompt, answer, prompt_lines, answer_lines))
        start = end
    return passages


def sst2_conversation(sentence: Sentence, rng: random.Random, system_share: float, follow_up_share: float) -> dict:
    """One SST-2 conversation: optional system prompt, the question and the label word, maybe one follow-up turn."""
    messages: list[dict[str, str]] = []
    if rng.random() < system_share:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    question = rng.choice(SST2_QUESTIONS).format(text=sentence.text)
    messages += [
        {"role": "user", "content": question},
        {"role": "assistant", "content": LABEL_WORDS[sentence.label]},
    ]
    kind = "sentiment"
    if rng.random() < follow_up_share:
        follow_up, answer = rng.choice(FOLLOW_UPS)
        messages += [
            {"role": "user", "content": follow_up},
            {"role": "assistant", "content": answer(sentence.label)},
        ]
        kind = "sentiment-follow-up"
    meta: dict[str, Any] = {"source": "sst2", "row": sentence.row, "label": sentence.label}
    if sentence.duplicate_rows:
        meta["duplicate_rows"] = list(sentence.duplicate_rows)
    return {"messages": messages, "review": sentence.text, "kind": kind, "meta": meta}


def shakespeare_conversation(passage: Passage, rng: random.Random, system_share: float) -> dict:
    """One Shakespeare conversation: optional system prompt, the passage to continue, and the lines that follow."""
    messages: list[dict[str, str]] = []
    if rng.random() < system_share:
        messages.append({"role": "system", "content": rng.choice(SHAKESPEARE_SYSTEM_PROMPTS)})
    messages += [
        {"role": "user", "content": rng.choice(SHAKESPEARE_QUESTIONS).format(text=passage.prompt)},
        {"role": "assistant", "content": passage.answer},
    ]
    meta = {
        "source": "shakespeare",
        "line": passage.line,
        "prompt_lines": passage.prompt_lines,
        "answer_lines": passage.answer_lines,
    }
    return {"messages": messages, "review": passage.prompt, "kind": "continuation", "meta": meta}


def counts(rows: int | None, share: float, sst2_available: int, passages_available: int) -> tuple[int, int]:
    """How many SST-2 and Shakespeare conversations to write."""
    if rows is None:  # every SST-2 sentence, and Shakespeare to make up `share` of the whole (as far as it goes)
        n_shakespeare = round(sst2_available * share / (1 - share)) if share < 1 else passages_available
        if n_shakespeare > passages_available:
            print(
                f"build_chat_data: only {passages_available} Shakespeare passages; the share is lower than {share}",
                file=sys.stderr,
            )
            n_shakespeare = passages_available
        return (sst2_available if share < 1 else 0), n_shakespeare
    n_shakespeare = round(rows * share)
    n_sst2 = rows - n_shakespeare
    if n_sst2 > sst2_available or n_shakespeare > passages_available:
        raise SystemExit(
            f"build_chat_data: --rows {rows} with --shakespeare-share {share} needs {n_sst2} SST-2 sentences and "
            f"{n_shakespeare} Shakespeare passages; there are {sst2_available} and {passages_available}"
        )
    return n_sst2, n_shakespeare


def build(
    sst2: Path,
    shakespeare: Path | None,
    rows: int | None,
    seed: int,
    shakespeare_share: float,
    system_share: float = 0.3,
    follow_up_share: float = 0.25,
) -> tuple[list[dict], dict[str, int]]:
    """The conversations, shuffled for the seed, and a summary of what went in."""
    rng = random.Random(seed)
    sentences, conflicting = read_sst2(sst2)
    passages = read_passages(shakespeare, random.Random(f"{seed}/windows")) if shakespeare_share > 0 else []
    n_sst2, n_shakespeare = counts(rows, shakespeare_share, len(sentences), len(passages))
    # A sample keeps the file's order, so each pick depends on the seed alone.
    chosen_sentences = sorted(rng.sample(range(len(sentences)), n_sst2))
    chosen_passages = sorted(rng.sample(range(len(passages)), n_shakespeare))
    conversations = [sst2_conversation(sentences[i], rng, system_share, follow_up_share) for i in chosen_sentences]
    conversations += [shakespeare_conversation(passages[i], rng, system_share) for i in chosen_passages]
    rng.shuffle(conversations)
    summary = {
        "sst2": n_sst2,
        "shakespeare": n_shakespeare,
        "sst2_sentences_available": len(sentences),
        "sst2_conflicting_left_out": conflicting,
        "shakespeare_passages_available": len(passages),
        "multi_turn": sum(1 for c in conversations if sum(m["role"] == "user" for m in c["messages"]) > 1),
        "with_system": sum(1 for c in conversations if c["messages"][0]["role"] == "system"),
    }
    return conversations, summary


def _share(value: str) -> float:
    """argparse type: a share between 0 and 1."""
    share = float(value)
    if not 0 <= share <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return share


def _positive(value: str) -> int:
    """argparse type: a whole number of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, build the conversations, write the JSONL and print the summary on stderr."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sst2",
        type=Path,
        default=Path(os.environ.get("SST2_PATH") or DEFAULT_SST2),
        help="SST-2 train.tsv (default: $SST2_PATH, else ../shared/data/sst2/train.tsv beside the project)",
    )
    parser.add_argument(
        "--shakespeare",
        type=Path,
        default=Path(os.environ.get("SHAKESPEARE_PATH") or DEFAULT_SHAKESPEARE),
        help="tiny Shakespeare input.txt (default: $SHAKESPEARE_PATH, else ../shared/data/tinyshakespeare/input.txt)",
    )
    parser.add_argument("--out", type=Path, required=True, help="the JSONL to write ('-' for stdout)")
    parser.add_argument(
        "--rows",
        type=_positive,
        default=None,
        help="conversations in all (default: every usable SST-2 sentence, plus Shakespeare for its share)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the same seed and inputs give the same bytes")
    parser.add_argument(
        "--shakespeare-share", type=_share, default=0.1, help="share of the conversations from Shakespeare (0.1)"
    )
    parser.add_argument("--system-share", type=_share, default=0.3, help="share with a system prompt (0.3)")
    parser.add_argument(
        "--follow-up-share", type=_share, default=0.25, help="share of SST-2 conversations with a follow-up (0.25)"
    )
    args = parser.parse_args(argv)
    conversations, summary = build(
        args.sst2,
        args.shakespeare,
        args.rows,
        args.seed,
        args.shakespeare_share,
        args.system_share,
        args.follow_up_share,
    )
    text = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations)
    if str(args.out) == "-":
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    print("build_chat_data: " + json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
