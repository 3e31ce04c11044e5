"""Named chat templates (Jinja, the language of Hugging Face's `tokenizer.chat_template`) for tokenizers that ship
none, and the role rules a conversation must follow to be rendered by them.

Written out here rather than downloaded: a base model's tokenizer usually has no template, and fine-tuning it for
chat needs one that training and serving agree on. Each template renders an assistant turn as a fixed header, the
content, then an end-of-turn token the model learns to emit (so generation stops); `add_generation_prompt` renders
the header alone, which is what makes the prefix rendering of data/chat.py find where each answer starts.
"""

from __future__ import annotations

from typing import Any

from raytune_ft.config.schema import CHAT_TEMPLATES

# <|im_start|>role\ncontent<|im_end|>\n  (OpenAI's ChatML, used by Qwen, Hermes, SmolLM and others)
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama 3: <|begin_of_text|> once, then <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> per turn
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Zephyr: <|role|>\ncontent</s>\n, with the tokenizer's own end-of-sequence token closing each turn.
# The generation prompt includes the newline, so the answer's first token is content, not a separator.
ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "zephyr": ZEPHYR}
assert tuple(TEMPLATES) == CHAT_TEMPLATES, "data.chat.template's names (config/schema.py) and these must agree"
DEFAULT_TEMPLATE = "chatml"

# The markers each template writes, which a tokenizer should hold as single (special) tokens: otherwise they are
# spelt out in pieces, which trains but wastes tokens and lets the markers blur into text. Adding them (and
# resizing the model's embeddings) is the training side's job; `missing_special_tokens` says which to add.
SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "zephyr": ("<|system|>", "<|user|>", "<|assistant|>"),
}

ROLES = ("system", "user", "assistant")

# Which role may come after which: None stands for the start and the end of the conversation. Every pair not
# listed is an error with its message (`{at}` is the turn number, 1-based, of the second turn of the pair). This is
# the strict shape all three templates above and most tokenizer templates assume: an optional system prompt first,
# then user and assistant alternating, ending on an answer (a trailing question teaches nothing).
ALLOWED_NEXT: dict[str | None, tuple[str | None, ...]] = {
    None: ("system", "user"),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user", None),
}
ROLE_ERRORS: dict[tuple[str | None, str | None], str] = {
    (None, None): "has no turns",
    (None, "assistant"): "starts with an assistant turn; the first turn (after an optional system prompt) must be "
    "the user's",
    ("system", "system"): "has two system turns in a row (turns {prev} and {at}); merge them into one",
    ("system", "assistant"): "has an assistant turn right after the system prompt (turn {at}); a user turn must "
    "come first",
    ("system", None): "has only a system prompt",
    ("user", "user"): "has two user turns in a row (turns {prev} and {at}); merge them or put the assistant's "
    "answer between them",
    ("user", "system"): "has a system turn that is not first (turn {at}); the system prompt must open the conversation",
    ("user", None): "ends on a user turn (turn {prev}); the last turn must be the assistant's answer",
    ("assistant", "assistant"): "has two assistant turns in a row (turns {prev} and {at}); user and assistant must "
    "alternate",
    ("assistant", "system"): "has a system turn that is not first (turn {at}); the system prompt must open the "
    "conversation",
}


def role_problems(roles: list[str]) -> list[str]:
    """What is wrong with this sequence of (known) roles under ALLOWED_NEXT: the first broken pair's message, or
    nothing. Only the first: a misplaced turn breaks the pair after it too, and that second message would mislead."""
    sequence: list[str | None] = [None, *roles, None]
    for i in range(1, len(sequence)):
        prev, role = sequence[i - 1], sequence[i]
        if role not in ALLOWED_NEXT[prev]:
            return [ROLE_ERRORS[(prev, role)].format(prev=i - 1, at=i)]
    return []


def missing_special_tokens(tokenizer: Any, name: str) -> list[str]:
    """The markers of template NAME that TOKENIZER would split into several tokens."""
    vocab = tokenizer.get_vocab()
    return [token for token in SPECIAL_TOKENS.get(name, ()) if token not in vocab]
