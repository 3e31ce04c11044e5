"""Chat and instruction data (raytune_ft/data/chat.py): reading the three row shapes, the errors that name file and
line, curation, rendering with chat templates, answer-only loss masks checked token by token, length policies and
the split helpers."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from raytune_ft.data.chat import (
    IGNORE_INDEX,
    ChatColumns,
    ChatDataError,
    Conversation,
    Turn,
    as_records,
    build_chat_rows,
    conversation_key,
    curate_conversations,
    prepare_chat,
    read_conversations,
    resolve_template,
    split_text,
    take_by_lines,
    tokenize_conversation,
)
from raytune_ft.data.chat_templates import ALLOWED_NEXT, ROLE_ERRORS, ROLES, TEMPLATES, role_problems
from raytune_ft.data.readers import DataError
from raytune_ft.errors import InputError

CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
ZEPHYR_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

SYSTEM = "You are a terse assistant."
ROUNDS = [("What is 2+2?", "4."), ("And 3+3?", "It is 6!")]


def two_round_chat(line: int = 1) -> Conversation:
    turns = [Turn("system", SYSTEM)]
    for question, answer in ROUNDS:
        turns += [Turn("user", question), Turn("assistant", answer)]
    return Conversation(tuple(turns), line)


@pytest.fixture(scope="module")
def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer without merges (one token per byte, so a newline is a token of its own) plus the
    template markers as special tokens, and </s> as end of sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    wrapped.add_special_tokens({"additional_special_tokens": CHATML_TOKENS + LLAMA3_TOKENS + ZEPHYR_TOKENS})
    return wrapped


@pytest.fixture(scope="module")
def word_tokenizer() -> Any:
    """A lower-casing word-level tokenizer (whitespace and punctuation split, so newlines vanish) with the ChatML
    markers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "[UNK] [PAD] system user assistant you are a terse what is and it 2 3 4 6 + ? . !".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    wrapped.add_special_tokens({"additional_special_tokens": CHATML_TOKENS})
    return wrapped


def kept_runs(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The learned tokens, decoded one contiguous run at a time."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return [tokenizer.decode(run) for run in runs]


# ------------------------------------------------------------------------------------------------ loss masks


def test_chatml_mask_token_by_token_with_a_byte_level_tokenizer(byte_tokenizer: Any) -> None:
    """Every token of system, user and template is masked, newlines after <|im_end|> included; each answer's
    content and its <|im_end|> are learned, in both rounds."""
    pieces: list[tuple[str, bool]] = [("<|im_start|>", False), (f"system\n{SYSTEM}", False), ("<|im_end|>", False)]
    for question, answer in ROUNDS:
        pieces += [("\n", False), ("<|im_start|>", False), (f"user\n{question}", False), ("<|im_end|>", False)]
        pieces += [("\n", False), ("<|im_start|>", False), ("assistant\n", False), (answer, True)]
        pieces += [("<|im_end|>", True)]
    pieces.append(("\n", False))
    expected_ids: list[int] = []
    expected_learned: list[bool] = []
    for text, learned in pieces:
        ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
        expected_ids += ids
        expected_learned += [learned] * len(ids)

    name, jinja = resolve_template(byte_tokenizer)
    chat = tokenize_conversation(two_round_chat(), byte_tokenizer, jinja)

    assert name == "chatml"
    assert chat.input_ids == expected_ids
    for i, (token, label, learned) in enumerate(zip(chat.input_ids, chat.labels, expected_learned, strict=True)):
        assert label == (token if learned else IGNORE_INDEX), f"token {i} {byte_tokenizer.decode([token])!r}"
    assert kept_runs(byte_tokenizer, chat.input_ids, chat.labels) == ["4.<|im_end|>", "It is 6!<|im_end|>"]
    assert chat.answer_turns == [2, 4]
    assert chat.answer_ends[-1] == len(chat.input_ids)


def test_chatml_mask_token_by_token_with_a_word_level_tokenizer(word_tokenizer: Any) -> None:
    _, jinja = resolve_template(word_tokenizer, "chatml")
    chat = tokenize_conversation(two_round_chat(), word_tokenizer, jinja)
    shown = [
        f"[{t}]" if label != IGNORE_INDEX else t
        for t, label in zip(word_tokenizer.convert_ids_to_tokens(chat.input_ids), chat.labels, strict=True)
    ]
    assert " ".join(shown) == (
        "<|im_start|> system you are a terse assistant . <|im_end|> "
        "<|im_start|> user what is 2 + 2 ? <|im_end|> "
        "<|im_start|> assistant [4] [.] [<|im_end|>] "
        "<|im_start|> user and 3 + 3 ? <|im_end|> "
        "<|im_start|> assistant [it] [is] [6] [!] [<|im_end|>]"
    )


@pytest.mark.parametrize(("template", "end"), [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("zephyr", "</s>")])
def test_every_named_template_learns_answers_and_their_end_token(byte_tokenizer: Any, template: str, end: str) -> None:
    rows = build_chat_rows([two_round_chat()], byte_tokenizer, template=template)
    assert rows.report["chat"]["template"] == template
    assert kept_runs(byte_tokenizer, rows.input_ids[0], rows.labels[0]) == [a + end for _, a in ROUNDS]


def test_train_on_all_keeps_every_token(byte_tokenizer: Any) -> None:
    rows = build_chat_rows([two_round_chat()], byte_tokenizer, train_on="all")
    assert rows.labels[0] == rows.input_ids[0]
    assert rows.report["tokens"]["trained"] == rows.report["tokens"]["after"] == len(rows.input_ids[0])


def test_the_tokenizers_own_template_wins_unless_one_is_named(byte_tokenizer: Any) -> None:
    own = TEMPLATES["zephyr"]
    byte_tokenizer.chat_template = own
    try:
        assert resolve_template(byte_tokenizer) == ("tokenizer", own)
        assert resolve_template(byte_tokenizer, "tokenizer") == ("tokenizer", own)
        assert resolve_template(byte_tokenizer, "chatml") == ("chatml", TEMPLATES["chatml"])
        rows = build_chat_rows([two_round_chat()], byte_tokenizer)
        assert kept_runs(byte_tokenizer, rows.input_ids[0], rows.labels[0]) == [a + "</s>" for _, a in ROUNDS]
    finally:
        byte_tokenizer.chat_template = None
    with pytest.raises(InputError, match="has no chat template"):
        resolve_template(byte_tokenizer, "tokenizer")
    with pytest.raises(InputError, match="unknown data.chat.template 'vicuna'"):
        resolve_template(byte_tokenizer, "vicuna")


def test_a_template_that_rewrites_earlier_turns_is_explained(byte_tokenizer: Any) -> None:
    """A template that marks the last turn renders a prefix differently from the whole: answers cannot be found."""
    marks_last = TEMPLATES["chatml"].replace("{{ '<|im_start|>'", "{{ ('LAST' if loop.last else '') + '<|im_start|>'")
    byte_tokenizer.chat_template = marks_last
    try:
        with pytest.raises(DataError, match=r"^chats.jsonl:7: the chat template renders .* data.chat.train_on"):
            build_chat_rows([two_round_chat(line=7)], byte_tokenizer, source="chats.jsonl")
    finally:
        byte_tokenizer.chat_template = None


def test_bad_settings_are_input_errors(byte_tokenizer: Any) -> None:
    for kwargs, message in [
        ({"train_on": "answers"}, "data.chat.train_on"),
        ({"length_policy": "cut"}, "data.chat.length_policy"),
        ({"max_tokens": 0}, "data.chat.max_tokens"),
    ]:
        with pytest.raises(InputError, match=message):
            build_chat_rows([two_round_chat()], byte_tokenizer, **kwargs)


# ------------------------------------------------------------------------------------------------ length


def test_truncate_keeps_whole_earlier_rounds_and_drops_a_first_answer_that_does_not_fit(byte_tokenizer: Any) -> None:
    full = build_chat_rows([two_round_chat()], byte_tokenizer)
    first_end = tokenize_conversation(two_round_chat(), byte_tokenizer, TEMPLATES["chatml"]).answer_ends[0]
    total = len(full.input_ids[0])

    rows = build_chat_rows([two_round_chat(1), two_round_chat(2)], byte_tokenizer, max_tokens=total - 1)
    assert [len(ids) for ids in rows.input_ids] == [first_end, first_end]
    assert rows.conversations[0].turns == two_round_chat().turns[:3]
    assert kept_runs(byte_tokenizer, rows.input_ids[0], rows.labels[0]) == ["4.<|im_end|>"]
    step = rows.report["steps"][0]
    assert step == {
        "name": "length_truncate",
        "rows_in": 2,
        "rows_out": 2,
        "removed": 0,
        "max_tokens": total - 1,
        "policy": "truncate",
        "truncated": 2,
        "first_answer_too_long": 0,
    }
    assert rows.report["tokens"]["before"] == 2 * total and rows.report["tokens"]["after"] == 2 * first_end

    short = build_chat_rows([two_round_chat()], byte_tokenizer, max_tokens=first_end - 1)
    assert short.conversations == [] and short.report["steps"][0]["first_answer_too_long"] == 1

    dropped = build_chat_rows([two_round_chat()], byte_tokenizer, max_tokens=total - 1, length_policy="drop")
    assert dropped.conversations == [] and dropped.report["steps"][0]["too_long"] == 1
    kept = build_chat_rows([two_round_chat()], byte_tokenizer, max_tokens=total, length_policy="drop")
    assert kept.input_ids == full.input_ids


# ------------------------------------------------------------------------------------------------ reading


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def msgs(*pairs: tuple[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def test_reads_messages_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chats.jsonl", [msgs(("user", "hi"), ("assistant", "hello")), two_round_row()])
    source = read_conversations(path)
    assert (source.format, source.shape) == ("jsonl", "messages")
    assert source.conversations[0] == Conversation((Turn("user", "hi"), Turn("assistant", "hello")), 1)
    assert source.conversations[1] == two_round_chat(line=2)


def two_round_row() -> dict[str, Any]:
    return {"messages": two_round_chat().messages()}


def test_reads_alpaca_rows_with_and_without_input(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
            {"instruction": "Say hi.", "output": "hi"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
        ],
    )
    source = read_conversations(path)
    assert source.shape == "instruction"
    assert [c.turns for c in source.conversations] == [
        (Turn("user", "Add the numbers.\n\n2 and 2"), Turn("assistant", "4")),
        (Turn("user", "Say hi."), Turn("assistant", "hi")),
        (Turn("user", "Say hi."), Turn("assistant", "hi")),
    ]


def test_reads_prompt_completion_csv_with_mapped_columns_and_multiline_cells(tmp_path: Path) -> None:
    path = tmp_path / "pc.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerows([["q", "a"], ["first\nquestion", "one"], ["second", "two"]])
    source = read_conversations(path, columns=ChatColumns(prompt="q", completion="a"))
    assert source.shape == "prompt"
    assert [(c.line, c.turns[0].content, c.turns[1].content) for c in source.conversations] == [
        (2, "first\nquestion", "one"),
        (4, "second", "two"),
    ]


def test_reads_messages_from_parquet_and_from_a_csv_json_cell(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [two_round_row(), msgs(("user", "hi"), ("assistant", "hello"))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chats.parquet")
    assert [c.turns for c in read_conversations(tmp_path / "chats.parquet").conversations] == [
        two_round_chat().turns,
        (Turn("user", "hi"), Turn("assistant", "hello")),
    ]
    path = tmp_path / "chats.tsv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerows([["id", "conv"], ["a", json.dumps(rows[0]["messages"])]])
    source = read_conversations(path, columns=ChatColumns(messages="conv"))
    assert source.conversations == [two_round_chat(line=2)]


def test_every_bad_row_is_reported_at_once_with_its_line(tmp_path: Path) -> None:
    ok = ("user", "q"), ("assistant", "a")
    rows = [
        msgs(*ok),
        msgs(("user", "q"), ("bot", "a")),
        msgs(("user", None), ("assistant", "a")),
        msgs(("user", ["q"]), ("assistant", "a")),
        msgs(("system", "s"), ("user", "q")),
        msgs(("user", "q"), ("system", "s"), ("assistant", "a")),
        msgs(("user", "q"), ("user", "q2"), ("assistant", "a")),
        msgs(*ok, ("user", "more?")),
        msgs(("assistant", "a"), ("user", "q"), ("assistant", "a")),
        msgs(*ok, ("assistant", "again")),
        {"messages": "hi"},
        {"other": 1},
        msgs(),
    ]
    with pytest.raises(ChatDataError) as caught:
        read_conversations(write_jsonl(tmp_path / "bad.jsonl", rows))
    error = caught.value
    assert str(error).startswith(f"{tmp_path / 'bad.jsonl'}:2: turn 2 has unknown role 'bot'")
    assert "(12 rows with problems; also line 3: turn 1 (user) has no content;" in str(error)
    assert error.line == 2 and error.path == str(tmp_path / "bad.jsonl")
    assert error.problems == [
        (2, "turn 2 has unknown role 'bot' (roles: system, user, assistant)"),
        (3, "turn 1 (user) has no content"),
        (4, "turn 1 (user): content must be a string, got list"),
        (5, "conversation has no assistant turn"),
        (6, "conversation has a system turn that is not first (turn 2); the system prompt must open the conversation"),
        (
            7,
            "conversation has two user turns in a row (turns 1 and 2); merge them or put the assistant's answer "
            "between them",
        ),
        (8, "conversation ends on a user turn (turn 3); the last turn must be the assistant's answer"),
        (
            9,
            "conversation starts with an assistant turn; the first turn (after an optional system prompt) must be "
            "the user's",
        ),
        (10, "conversation has two assistant turns in a row (turns 2 and 3); user and assistant must alternate"),
        (11, "'messages' must be a list of {role, content} objects, got str"),
        (12, "no 'messages'"),
        (13, "conversation has no assistant turn"),
    ]


def test_alpaca_and_parquet_errors_name_the_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": 3}, {"instruction": None, "output": ""}])
    with pytest.raises(ChatDataError) as caught:
        read_conversations(path)
    assert caught.value.problems == [(1, "'output' must be a string, got int"), (2, "no 'instruction'")]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", None], "completion": ["b", "c"]}), tmp_path / "p.parquet")
    with pytest.raises(ChatDataError, match=r"p.parquet:2: row 2: no 'prompt'"):
        read_conversations(tmp_path / "p.parquet")


def test_file_level_faults_stop_at_once(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hi"}])
    with pytest.raises(DataError, match=r"x.jsonl: no chat columns: expected 'messages'.*set data.columns.messages"):
        read_conversations(path)
    (tmp_path / "broken.jsonl").write_text('{"messages": []}\n{"messages": [\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl:2: invalid JSON"):
        read_conversations(tmp_path / "broken.jsonl")
    (tmp_path / "plain.txt").write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError, match="plain text holds no conversations"):
        read_conversations(tmp_path / "plain.txt")


def test_role_rules_are_data_with_a_message_for_every_broken_pair() -> None:
    for prev in (None, *ROLES):
        for role in (*ROLES, None):
            if role not in ALLOWED_NEXT[prev]:
                assert (prev, role) in ROLE_ERRORS, (prev, role)
    assert role_problems(["system", "user", "assistant", "user", "assistant"]) == []
    assert role_problems(["user", "assistant"]) == []


# ------------------------------------------------------------------------------------------------ curation


def test_empty_answers_cut_the_conversation_and_repeats_are_removed() -> None:
    def conv(line: int, *pairs: tuple[str, str]) -> Conversation:
        return Conversation(tuple(Turn(r, c) for r, c in pairs), line)

    conversations = [
        conv(1, ("user", "Hi there"), ("assistant", "Hello.")),
        conv(2, ("user", "Hi there"), ("assistant", "Hello.")),  # exact repeat
        conv(3, ("user", "hi   THERE!"), ("assistant", "hello")),  # repeat after normalisation
        conv(
            4,
            ("user", "q1"),
            ("assistant", "a1"),
            ("user", "q2"),
            ("assistant", "  "),
            ("user", "q3"),
            ("assistant", "a3"),
        ),
        conv(5, ("system", "s"), ("user", "q"), ("assistant", "")),  # no answer left
        conv(6, ("user", "Hi there"), ("assistant", "Hello."), ("user", "more"), ("assistant", "sure")),
    ]
    kept, steps = curate_conversations(conversations)
    assert [c.line for c in kept] == [1, 4, 6]
    assert kept[1].turns == (Turn("user", "q1"), Turn("assistant", "a1"))
    assert [s.as_dict() for s in steps] == [
        {"name": "drop_empty_answers", "rows_in": 6, "rows_out": 5, "removed": 1, "cut": 1, "no_answer_left": 1},
        {"name": "dedupe_exact", "rows_in": 5, "rows_out": 4, "removed": 1},
        {"name": "dedupe_normalized", "rows_in": 4, "rows_out": 3, "removed": 1},
    ]
    assert [c.line for c in curate_conversations(conversations, dedupe="exact")[0]] == [1, 3, 4, 6]
    assert conversation_key(conversations[0]) != conversation_key(conversations[2])


def test_prepare_chat_reports_each_step_and_the_tokens(tmp_path: Path, byte_tokenizer: Any) -> None:
    rows = [
        two_round_row(),
        two_round_row(),
        msgs(("user", "hi"), ("assistant", "")),
        msgs(("user", "a"), ("assistant", "b")),
    ]
    result = prepare_chat(write_jsonl(tmp_path / "c.jsonl", rows), byte_tokenizer, max_tokens=1000)
    assert [c.line for c in result.conversations] == [1, 4]
    report = result.report
    assert report["source"] == {
        "path": str(tmp_path / "c.jsonl"),
        "format": "jsonl",
        "shape": "messages",
        "rows_read": 4,
    }
    assert [(s["name"], s["removed"]) for s in report["steps"]] == [
        ("drop_empty_answers", 1),
        ("dedupe_exact", 1),
        ("dedupe_normalized", 0),
        ("length_truncate", 0),
    ]
    assert report["chat"] == {
        "template": "chatml",
        "train_on": "assistant",
        "max_tokens": 1000,
        "length_policy": "truncate",
    }
    assert report["tokens"]["after"] == report["tokens"]["before"] == sum(len(ids) for ids in result.input_ids)
    assert report["tokens"]["trained"] == sum(len(byte_tokenizer(a)["input_ids"]) + 1 for a in ("4.", "It is 6!", "b"))
    json.dumps(report)  # joins the JSON data report as it is


# ------------------------------------------------------------------------------------------------ split


def test_a_conversation_is_one_split_unit_keyed_by_its_questions() -> None:
    from raytune_ft.config.schema import SplitConfig
    from raytune_ft.data.split import split_records

    chats = [two_round_chat(line) for line in range(1, 4)]  # the same questions three times
    chats += [
        Conversation((Turn("user", f"question number {n} about topic {n}"), Turn("assistant", "ok")), 10 + n)
        for n in range(30)
    ]
    assert split_text(chats[0]) == "What is 2+2?\nAnd 3+3?"
    records = as_records(chats)
    splits, _, _ = split_records(records, SplitConfig(strategy="random"), str.casefold, "chats")
    owners = {line: name for name, recs in splits.items() for line in recs.rows}
    assert len({owners[1], owners[2], owners[3]}) == 1
    assert sorted(c.line for name in splits for c in take_by_lines(chats, splits[name])) == sorted(
        c.line for c in chats
    )


def test_a_generation_prompt_shorter_than_the_answers_header_leaves_the_separator_masked(byte_tokenizer: Any) -> None:
    """Zephyr's published template prompts generation with '<|assistant|>' but writes '<|assistant|>\\n' before an
    answer: the newline the turn adds is a separator, not part of what is learned."""
    published = TEMPLATES["zephyr"].replace("{{ '<|assistant|>\\n' }}", "{{ '<|assistant|>' }}")
    assert published != TEMPLATES["zephyr"]
    byte_tokenizer.chat_template = published
    try:
        rows = build_chat_rows([two_round_chat()], byte_tokenizer)
    finally:
        byte_tokenizer.chat_template = None
    assert kept_runs(byte_tokenizer, rows.input_ids[0], rows.labels[0]) == [a + "</s>" for _, a in ROUNDS]


def test_the_chat_modules_import_without_ray_or_torch() -> None:
    import subprocess
    import sys

    code = "import sys, raytune_ft.data.chat; print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("tokenizer_fixture", ["byte_tokenizer", "word_tokenizer"])
def test_the_mask_agrees_with_transformers_generation_markers(tokenizer_fixture: str, request: Any) -> None:
    """An independent check: ChatML with {% generation %} around each answer and its <|im_end|> gives, through
    transformers' return_assistant_tokens_mask, the same tokens and the same learned positions as prefix rendering."""
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    marked = TEMPLATES["chatml"].replace(
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endif %}",
    )
    assert "generation" in marked
    theirs = tokenizer.apply_chat_template(
        two_round_chat().messages(), chat_template=marked, return_dict=True, return_assistant_tokens_mask=True
    )
    ours = tokenize_conversation(two_round_chat(), tokenizer, TEMPLATES["chatml"])
    assert ours.input_ids == list(theirs["input_ids"])
    assert [label != IGNORE_INDEX for label in ours.labels] == [bool(m) for m in theirs["assistant_masks"]]


def test_train_on_all_accepts_a_template_that_breaks_the_prefix_rule(byte_tokenizer: Any) -> None:
    marks_last = TEMPLATES["chatml"].replace("{{ '<|im_start|>'", "{{ ('LAST' if loop.last else '') + '<|im_start|>'")
    byte_tokenizer.chat_template = marks_last
    try:
        rows = build_chat_rows([two_round_chat()], byte_tokenizer, train_on="all")
        total = len(rows.input_ids[0])
        assert rows.labels[0] == rows.input_ids[0]
        short = build_chat_rows([two_round_chat()], byte_tokenizer, train_on="all", max_tokens=total - 1)
    finally:
        byte_tokenizer.chat_template = None
    assert short.conversations == [] and short.report["steps"][0]["first_answer_too_long"] == 1


def test_missing_special_tokens_names_the_markers_a_tokenizer_would_split(word_tokenizer: Any) -> None:
    from raytune_ft.data.chat_templates import missing_special_tokens

    assert missing_special_tokens(word_tokenizer, "chatml") == []
    assert missing_special_tokens(word_tokenizer, "zephyr") == ZEPHYR_TOKENS
    assert missing_special_tokens(word_tokenizer, "tokenizer") == []
