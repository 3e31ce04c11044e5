"""The HTTP API: FastAPI routes, request schemas built from `serve.limits`, and the error responses clients expect.

Checks that need no body run first, in an ASGI middleware: 401 (API key: every route but /healthz, and the docs
when serve.public_docs says so; a route added later is guarded without being listed), 413 (a declared
Content-Length over the limit, refused before anything is read; a body without one is counted as it arrives),
415 (POST without a JSON content type). FastAPI then answers 404/405 for unknown routes and methods, 400 for a
body that is not JSON (or not UTF-8), 422 for JSON that breaks the schema. (FastAPI's own `max_body_size`
answers 413 in plain text, hence the middleware.)
Every error body is {"error": {"message", "type", "param", "code"}}, the shape OpenAI clients already parse.
Overload: past `serve.max_ongoing_requests` requests at work and `serve.max_queued_requests` waiting in a replica,
429 with Retry-After (Ray Serve's own backpressure answers 429 in plain text, from its proxy, so admission is
decided here and Serve is sized to hand every request to a replica).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from raytune_ft.config.schema import RequestLimits

logger = logging.getLogger("ray.serve")  # into the replica's log, where Serve's own lines go

CLASSIFY, COMPLETIONS, MODELS, HEALTH = "/v1/classify", "/v1/completions", "/v1/models", "/healthz"
CHAT = "/v1/chat/completions"
DOCS_ROUTES = {"/docs", "/docs/oauth2-redirect", "/openapi.json"}
JSON_ROUTES = {CLASSIFY, COMPLETIONS, CHAT}
# Ray Serve's model multiplexing header: routes a request to a replica that has the adapter loaded
MODEL_HEADER = "serve_multiplexed_model_id"
BATCH_SIZE_HEADER = "x-batch-size"  # the size of the server-side batch that served a classify request
REPLICA_HEADER = "x-replica"  # the Serve replica that answered: load spread and autoscaling seen from outside
SERVER_TIMING = "server-timing"  # W3C Server-Timing: where a request's time in the replica went


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class ApiError(Exception):
    """A request the routes refuse after validation (unknown model, prompt too long...): answered as its JSON
    error body."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("text is empty")
    return text


def classify_model(limits: RequestLimits, tasks: tuple[str, ...] = (), task_required: bool = False) -> type[BaseModel]:
    """The classify request schema, with this deployment's limits in it (so the OpenAPI schema shows them too).
    TASKS: the classification tasks of a multi-task export, which a classify request may name (default: its own; a
    causal-LM export's classification tasks must be named: TASK_REQUIRED). `model`: the adapter, when one
    deployment serves several (generation's schemas: serve/generate.py)."""
    # not blank: checked by _not_blank (its own message), shown to schema readers as a pattern
    not_blank = Field(json_schema_extra={"pattern": r"\S"})
    Text = Annotated[
        str, StringConstraints(min_length=1, max_length=limits.max_text_chars), AfterValidator(_not_blank), not_blank
    ]

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str | None = None
        text: Text | Annotated[list[Text], Field(min_length=1, max_length=limits.max_items)]

    if tasks and task_required:

        class ClassifyRequest(ClassifyRequest):  # type: ignore[no-redef]
            task: Literal[tasks]  # type: ignore[valid-type]

    elif tasks:

        class ClassifyRequest(ClassifyRequest):  # type: ignore[no-redef]
            task: Literal[tasks] | None = None  # type: ignore[valid-type]

    return ClassifyRequest


# The answers, for the OpenAPI schema only: the routes return plain dicts (no response validation per request)
class Prediction(BaseModel):
    label: str
    label_id: int
    probs: dict[str, float]


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]


class Choice(BaseModel):
    text: str
    index: int
    logprobs: None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    """With `stream: true`: server-sent events of `chat.completion.chunk` objects, then `data: [DONE]`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"]
    task: str
    labels: list[str] | None
    base_model: str | None
    checkpoint_step: int | None
    metrics: dict[str, Any]
    test_metrics: dict[str, Any] | None
    exported: str | None
    experiment: str | None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    # the generation engine's counters (running, waiting, finished, cancelled, failed, steps, prefills,
    # largest_batch); null for a classifier
    generation: dict[str, int] | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int
    details: list[dict[str, Any]] | None = None  # 422: every schema error, with its location


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERRORS = {
    400: "the body is not JSON, or not UTF-8; a prompt over the context (context_length_exceeded); no model named",
    404: "no such model (an adapter this deployment does not serve)",
    401: "missing or wrong API key (serve.api_key_env)",
    413: "the body is over serve.limits.max_body_bytes",
    415: "not Content-Type: application/json",
    422: "valid JSON that breaks the request schema",
    429: "overloaded: retry after Retry-After seconds",
    500: "a bug (the replica keeps serving)",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route answering CODES, each with the error body (documented in its OpenAPI schema)."""
    return {code: {"model": ErrorResponse, "description": _ERRORS[code]} for code in codes}


class Admission:
    """Per replica: `ongoing` API requests at work, `queued` more waiting, the rest refused with 429."""

    def __init__(self, ongoing: int, queued: int, retry_after_s: float) -> None:
        self.ongoing, self.queued = ongoing, queued
        self.retry_after = str(max(1, math.ceil(retry_after_s))) if retry_after_s > 0 else None
        self.working = 0
        self.waiting = 0
        self._turn: asyncio.Semaphore | None = None

    def full(self) -> bool:
        return self.working >= self.ongoing and 0 <= self.queued <= self.waiting

    async def __aenter__(self) -> None:
        self._turn = self._turn or asyncio.Semaphore(self.ongoing)  # created in the replica's event loop
        self.waiting += 1
        try:
            await self._turn.acquire()
        finally:
            self.waiting -= 1
        self.working += 1

    async def __aexit__(self, *exc: Any) -> None:
        self.working -= 1
        assert self._turn is not None
        self._turn.release()


class RequestGuard:
    """ASGI middleware: API key, body size, content type and admission, decided before the body is read."""

    def __init__(
        self, app: Any, api_key: str | None, max_body_bytes: int, admission: Admission, public_docs: bool = False
    ) -> None:
        self.app, self.api_key, self.max_body_bytes, self.admission = app, api_key, max_body_bytes, admission
        self.open_routes = {HEALTH} | (DOCS_ROUTES if public_docs else set())

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _timed(send, time.perf_counter())
        root, path = scope.get("root_path", ""), scope.get("path", "")
        route = path[len(root) :] if root and path.startswith(root) else path
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and route not in self.open_routes and not self._authorized(headers):
            return await _reply(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "auth")
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            if not declared.isdigit():
                return await _reply(send, 400, f"Content-Length is not a number: {declared!r}", "invalid_request")
            return await _reply(send, 413, self.too_large(), "body_too_large")
        if scope["method"] == "POST" and route in JSON_ROUTES:
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
                return await _reply(
                    send, 415, f"Content-Type must be application/json, got {kind or 'none'}", "media_type"
                )
            if self.admission.full():
                message = (
                    f"overloaded: {self.admission.working} requests at work and {self.admission.waiting} waiting "
                    "on this replica (serve.max_ongoing_requests, serve.max_queued_requests); retry later"
                )
                retry = {"Retry-After": self.admission.retry_after} if self.admission.retry_after else None
                return await _reply(send, 429, message, "overloaded", headers=retry)
            async with self.admission:
                return await self.app(scope, self._counted(receive), send)
        return await self.app(scope, self._counted(receive), send)

    def too_large(self) -> str:
        return f"the request body is over {self.max_body_bytes} bytes (serve.limits.max_body_bytes)"

    def _counted(self, receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[dict]]:
        """A body without Content-Length (chunked) is counted as it arrives and refused past the limit."""
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    # FastAPI's HTTPException: FastAPI re-raises it from a body read (others become 400s)
                    raise HTTPException(413, self.too_large())
            return message

        return counted

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        assert self.api_key is not None
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def _timed(send: Callable, started: float) -> Callable:
    """SEND, adding `Server-Timing: app;dur=MS` (the request's time in the app so far) to the response head."""

    async def timed(message: dict) -> None:
        if message["type"] == "http.response.start":
            app_ms = 1000 * (time.perf_counter() - started)
            headers = [*message.get("headers", []), (SERVER_TIMING.encode(), f"app;dur={app_ms:.2f}".encode())]
            message = {**message, "headers": headers}
        await send(message)

    return timed


async def _reply(
    send: Callable, status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None
) -> None:
    response = JSONResponse(error_body(status, message, kind, param), status_code=status, headers=headers)
    await response({"type": "http"}, _never_receive, send)


async def _never_receive() -> dict:  # a reply sent before the body is read never needs it
    return {"type": "http.disconnect"}


def build_api(
    title: str, api_key: str | None, limits: RequestLimits, admission: Admission, public_docs: bool = False
) -> FastAPI:
    """The FastAPI app with error handling; routes are added by the Serve deployment (serve/app.py)."""
    # no redirect from /v1/classify/ to /v1/classify (an empty 307, which urllib does not follow for a POST): the
    # unknown route gets its JSON 404 like any other
    api = FastAPI(title=title, version="1", docs_url="/docs", redoc_url=None, redirect_slashes=False)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            first = next(e for e in errors if e.get("type") == "json_invalid")
            reason = (first.get("ctx") or {}).get("error", "")
            message = f"the body is not valid JSON{': ' + str(reason) if reason else ''}"
            return JSONResponse(error_body(400, message, "invalid_json"), status_code=400)
        first = errors[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "; ".join(_describe(e) for e in errors[:5])
        body = error_body(422, message, "invalid_request", param)
        body["error"]["details"] = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg"), "type": e.get("type")} for e in errors
        ]
        return JSONResponse(body, status_code=422)

    @api.exception_handler(ApiError)
    async def refused(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.kind, exc.param), status_code=exc.status)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "http_error")
        message = {
            404: f"no route {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
            413: f"the request body is over {limits.max_body_bytes} bytes (serve.limits.max_body_bytes)",
        }.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(exc.status_code, message, kind), exc.status_code, headers=exc.headers)

    @api.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # The replica stays up; the client gets JSON like every other error, with an id to find the traceback by in
        # the replica's log, and not the exception's text (which can hold a path, a setting or the input).
        request_id = uuid.uuid4().hex[:16]
        logger.exception("request %s (%s %s) failed", request_id, request.method, request.url.path)
        message = f"internal error (request id {request_id}); the server's log has the details"
        return JSONResponse(error_body(500, message, "internal_error"), status_code=500)

    @api.exception_handler(UnicodeDecodeError)
    async def not_utf8(request: Request, exc: UnicodeDecodeError) -> JSONResponse:
        return JSONResponse(error_body(400, "the body is not UTF-8 text", "invalid_json"), status_code=400)

    api.add_middleware(
        RequestGuard,
        api_key=api_key,
        max_body_bytes=limits.max_body_bytes,
        admission=admission,
        public_docs=public_docs,
    )
    return api


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error.get("loc", ())[1:])
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
