"""The OpenAI-compatible generation routes' parts: request schemas, answers, and server-sent event streams.

`/v1/chat/completions` and `/v1/completions` take what OpenAI clients send. A field asking for something this
server does not do (tools, logprobs, n > 1, penalties...) is refused with 422 naming it, rather than ignored: an
answer that silently skipped it would look like the model's. Tokens come from the replica's GenerationEngine
(serve/engine.py), which generates every request in flight together; text comes out through a TextStream
(serve/detokenize.py), which holds back what could still become a stop string or an unfinished character.

A stream is `data: {chunk}` events in OpenAI's chunk format, ending with `data: [DONE]`. A stream that fails
midway ends with one `data: {"error": ...}` event (the error body of the JSON routes) and no [DONE], so a client
sees the failure instead of a hung or silently truncated answer. A client that goes away cancels the request
(Ray Serve cancels the handler), which closes the token iterator and takes the request out of the batch.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from raytune_ft.config.schema import RequestLimits

logger = logging.getLogger("ray.serve")

GREEDY_BELOW = 1e-5  # as vLLM does: sampling at a temperature this small is greedy (at 1e-300 logits overflow)
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer a stream

# Fields OpenAI clients may send for features this server does not have: refused unless they hold the value that
# asks for nothing (the default).
UNSUPPORTED: dict[str, Any] = {
    "n": 1,
    "best_of": 1,
    "logprobs": False,
    "top_logprobs": 0,
    "echo": False,
    "suffix": "",
    "tools": [],
    "tool_choice": "none",
    "functions": [],
    "function_call": "none",
    "logit_bias": {},
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "response_format": {"type": "text"},
}


def _refuse_unsupported(raw: Any) -> Any:
    if isinstance(raw, dict):
        for name, nothing in UNSUPPORTED.items():
            value = raw.get(name)
            if value is not None and value != nothing:
                raise ValueError(f"{name}={json.dumps(value)[:80]} is not supported by this server")
    return raw


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


def generation_models(limits: RequestLimits) -> tuple[type[BaseModel], type[BaseModel]]:
    """(ChatCompletionRequest, CompletionRequest) with this deployment's limits in them, so the OpenAPI schema
    shows them; the prompt's length in tokens is only known once it is tokenised, and is documented as
    `x-max-prompt-tokens`."""
    Text = Annotated[str, StringConstraints(max_length=limits.max_text_chars)]
    Prompt = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_text_chars)]
    MaxTokens = Annotated[int, Field(ge=1, le=limits.max_tokens)]
    Stop = Annotated[str, StringConstraints(min_length=1, max_length=200)]
    prompt_tokens = {"x-max-prompt-tokens": limits.max_prompt_tokens}

    class Sampled(BaseModel):
        # OpenAI clients send more fields than are used (user, metadata, store...): ignored, unless they ask for a
        # feature this server lacks (UNSUPPORTED)
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
        top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
        seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
        stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None
        # vLLM's extension (OpenAI clients send it in extra_body): generate max_tokens whatever the model says, the
        # fixed output length benchmarks need
        ignore_eos: bool = False

        @model_validator(mode="before")
        @classmethod
        def _unsupported(cls, raw: Any) -> Any:
            return _refuse_unsupported(raw)

        def stops(self) -> list[str]:
            return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    class ChatMessage(BaseModel):
        model_config = ConfigDict(extra="ignore")
        # "developer" is what newer OpenAI clients send for a system prompt
        role: Literal["system", "developer", "user", "assistant"]
        content: Text | Annotated[list[TextPart], Field(max_length=limits.max_items)]

        def text(self) -> str:
            return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    class ChatCompletionRequest(Sampled):
        messages: Annotated[
            list[ChatMessage], Field(min_length=1, max_length=limits.max_messages, json_schema_extra=prompt_tokens)
        ]
        max_tokens: MaxTokens | None = None
        max_completion_tokens: MaxTokens | None = None

        def limit(self) -> int:
            return self.max_completion_tokens or self.max_tokens or limits.max_tokens

        def conversation(self) -> list[dict[str, str]]:
            return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    class CompletionRequest(Sampled):
        prompt: Annotated[Prompt, Field(json_schema_extra=prompt_tokens)]
        max_tokens: MaxTokens = min(16, limits.max_tokens)

        def limit(self) -> int:
            return self.max_tokens

    return ChatCompletionRequest, CompletionRequest


@dataclass(frozen=True)
class Generated:
    """A finished generation: its text and what the API reports about it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


async def pieces(
    engine: Any, tokenizer: Any, prompt_ids: list[int], body: Any, adapter: Any, stop_ids: list[int]
) -> AsyncIterator[str | Generated]:
    """The text of BODY's generation as it comes (pieces safe to show), then one Generated. A stop string ends it
    early (finish_reason "stop"); leaving the loop early cancels the generation."""
    from raytune_ft.serve.detokenize import TextStream
    from raytune_ft.serve.engine import Finish, Sampling

    temperature = 0.0 if body.temperature < GREEDY_BELOW else body.temperature
    sampling = Sampling(max_new_tokens=body.limit(), temperature=temperature, top_p=body.top_p, seed=body.seed)
    stream = TextStream(tokenizer, body.stops())
    count = 0
    stops = [] if body.ignore_eos else stop_ids
    async with aclosing(engine.generate(prompt_ids, sampling, adapter=adapter, stop_ids=stops)) as tokens:
        async for item in tokens:
            if isinstance(item, Finish):
                tail = stream.flush()
                if tail:
                    yield tail
                yield Generated(stream.text, item.reason, item.prompt_tokens, item.completion_tokens)
                return
            count += 1
            piece = stream.push(item)
            if piece:
                yield piece
            if stream.stopped:  # the stop string is cut; closing the iterator takes the request out of the batch
                yield Generated(stream.text, "stop", len(prompt_ids), count)
                return


async def complete(source: AsyncIterator[str | Generated]) -> Generated:
    # closed on return: a generation cut by a stop string leaves the batch now, not when the iterator is collected
    async with aclosing(source) as items:
        async for item in items:
            if isinstance(item, Generated):
                return item
    raise RuntimeError("generation ended without a result")


def usage(done: Generated) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def chat_answer(model: str, done: Generated) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": done.text},
                "logprobs": None,
                "finish_reason": done.finish_reason,
            }
        ],
        "usage": usage(done),
    }


def completion_answer(model: str, done: Generated) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"text": done.text, "index": 0, "logprobs": None, "finish_reason": done.finish_reason}],
        "usage": usage(done),
    }


def _event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def events(source: AsyncIterator[str | Generated], model: str, chat: bool, include_usage: bool) -> Any:
    """The server-sent events of one streamed generation (OpenAI's chunk format)."""
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    extra = {"usage": None} if include_usage else {}

    def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
        return _event({**head, "choices": [choice], **extra})

    try:
        if chat:
            yield chunk(None, None, role=True)
        async with aclosing(source) as items:
            async for item in items:
                if isinstance(item, Generated):
                    yield chunk(None, item.finish_reason)
                    if include_usage:
                        yield _event({**head, "choices": [], "usage": usage(item)})
                    break
                yield chunk(item, None)
        yield _event("[DONE]")
    except Exception as exc:  # the response has begun (200): the failure can only be told in the stream
        request_id = uuid.uuid4().hex[:16]
        logger.exception("stream %s failed midway", request_id)
        from raytune_ft.serve.api import error_body
        from raytune_ft.serve.engine import GenerationFailed

        kind = "generation_failed" if isinstance(exc, GenerationFailed) else "internal_error"
        message = f"generation failed midway (request id {request_id}); the server's log has the details"
        yield _event(error_body(500, message, kind))
