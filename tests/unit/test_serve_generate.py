"""The generation routes' parts (raytune_ft.serve.generate) without Ray: the request schemas OpenAI clients meet,
and the server-sent events of a real GenerationEngine on a tiny random Llama (tests/tiny_models.py), including a
stream whose engine fails midway."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from tiny_models import chat_tokenizer, llama_config
from transformers import LlamaForCausalLM

from raytune_ft.config.schema import RequestLimits
from raytune_ft.generation import greedy_answers
from raytune_ft.serve.engine import GenerationEngine
from raytune_ft.serve.generate import Generated, complete, events, generation_models, pieces
from raytune_ft.serve.model import chat_prompt_ids

EOS, PAD = 257, 258  # chat_tokenizer's <|im_end|> and <pad>
LIMITS = RequestLimits(max_tokens=32, max_messages=3, max_text_chars=50)
Chat, Completion = generation_models(LIMITS)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return chat_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(len(tokenizer), max_position_embeddings=256, initializer_range=0.3)).eval()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_the_chat_schema_takes_what_openai_clients_send_and_refuses_what_it_cannot_honour():
    body = Chat.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "gem"}]},
            ],
            "max_completion_tokens": 5,
            "stop": "x",
            "user": "u1",  # sent by clients, meaningless here: ignored
            "n": 1,
            "logprobs": False,
        }
    )
    assert body.conversation() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a gem"}]
    assert body.limit() == 5 and body.stops() == ["x"] and not body.stream
    assert Chat.model_validate({"messages": user("hi")}).limit() == 32  # default: serve.limits.max_tokens
    for bad, words in (
        ({"messages": user("hi"), "n": 2}, "n=2 is not supported"),
        ({"messages": user("hi"), "tools": [{"type": "function"}]}, "tools="),
        ({"messages": user("hi"), "response_format": {"type": "json_object"}}, "response_format="),
        ({"messages": user("hi"), "presence_penalty": 0.5}, "presence_penalty="),
        ({"messages": user("hi") * 4}, "at most 3"),
        ({"messages": user("x" * 51)}, "at most 50"),
        ({"messages": user("hi"), "max_tokens": 33}, "less than or equal to 32"),
        ({"messages": user("hi"), "stop": list("abcde")}, "at most 4"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
    ):
        with pytest.raises(ValidationError, match=words):
            Chat.model_validate(bad)
    assert Completion.model_validate({"prompt": "x"}).limit() == 16  # OpenAI's completions default
    schema = json.dumps(Chat.model_json_schema())
    assert '"x-max-prompt-tokens": 2048' in schema and '"maxItems": 3' in schema


async def _collect(source: Any) -> list[bytes]:
    return [event async for event in source]


def _events(raw: list[bytes]) -> list[Any]:
    out = []
    for event in raw:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        data = event[6:-2].decode()
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_a_stream_is_the_answer_in_chunks_and_a_stop_string_cuts_it(model, tokenizer):
    engine = GenerationEngine(model, pad_id=PAD, stop_ids=[EOS])
    try:
        prompt = chat_prompt_ids(tokenizer, user("what is two plus two?"))
        [want] = greedy_answers(model, [prompt], max_new_tokens=12, stop=[EOS], pad_id=PAD)
        text = tokenizer.decode(want, skip_special_tokens=True)
        body = Chat.model_validate({"messages": user("q"), "max_tokens": 12, "temperature": 0})

        async def run() -> tuple[Generated, list[bytes]]:
            done = await complete(pieces(engine, tokenizer, prompt, body, None, [EOS]))
            usage = body.model_copy(update={"stream_options": {"include_usage": True}})
            raw = await _collect(events(pieces(engine, tokenizer, prompt, usage, None, [EOS]), "m", True, True))
            return done, raw

        done, raw = asyncio.run(run())
        assert done.text == text and done.completion_tokens == len(want)
        assert done.finish_reason == ("length" if len(want) == 12 else "stop")
        chunks = _events(raw)
        assert chunks[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2]) == text
        assert chunks[-3]["choices"][0]["finish_reason"] == done.finish_reason
        assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == len(want)

        # a stop string: the text ends before it, finish_reason "stop", and generation ends there
        if len(text) >= 3:
            stop = text[1:3]
            cut = body.model_copy(update={"stop": [stop]})
            done = asyncio.run(complete(pieces(engine, tokenizer, prompt, cut, None, [EOS])))
            assert done.text == text[: text.index(stop)] and done.finish_reason == "stop"
            deadline = time.monotonic() + 10
            while engine.stats()["cancelled"] < 1 or engine.stats()["running"]:  # left at the next step
                assert time.monotonic() < deadline, engine.stats()
                time.sleep(0.01)
    finally:
        engine.close()


def test_a_stream_whose_generation_fails_midway_ends_with_an_error_event(model, tokenizer):
    """The engine's third forward raises (a real fault in the model's forward pass): the stream has begun (200),
    so it ends with one error event and no [DONE]; the engine serves the next request."""
    engine = GenerationEngine(model, pad_id=PAD, stop_ids=[EOS])
    calls = {"n": 0}

    def fail_third(module: Any, args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the model broke (secret detail)")

    handle = model.register_forward_pre_hook(fail_third)
    try:
        prompt = chat_prompt_ids(tokenizer, user("hi"))
        body = Chat.model_validate({"messages": user("q"), "max_tokens": 20, "temperature": 0, "ignore_eos": True})
        raw = asyncio.run(_collect(events(pieces(engine, tokenizer, prompt, body, None, [EOS]), "m", True, False)))
        chunks = _events(raw)
        assert "[DONE]" not in chunks
        error = chunks[-1]["error"]
        assert error["type"] == "generation_failed" and error["code"] == 500 and "request id" in error["message"]
        assert "secret" not in json.dumps(chunks)  # the log has the exception, the client an id
        assert engine.stats()["failed"] == 1
        handle.remove()
        done = asyncio.run(complete(pieces(engine, tokenizer, prompt, body, None, [EOS])))
        assert done.completion_tokens == 20 and done.finish_reason == "length"  # ignore_eos: max_tokens long
    finally:
        handle.remove()
        engine.close()
