"""The Ray Serve application: one deployment with a FastAPI ingress serving one export, or several LoRA exports as
adapters of one base model (Ray Serve model multiplexing: `serve_multiplexed_model_id` or the body's `model` picks
the adapter; each replica keeps `serve.max_adapters_per_replica` loaded, LRU).

Generation (`/v1/chat/completions`, `/v1/completions`, streamed or not) goes through the replica's
GenerationEngine, which batches every request in flight (serve/engine.py; the routes' parts: serve/generate.py).

Classification requests are split into single texts that Serve's dynamic batching (`@serve.batch`) groups into
one forward pass, so concurrent clients share batches. Response headers: `x-batch-size` (the batch that served
the request), `x-replica` (the replica that did) and `Server-Timing` (the request's time in the replica: `model`
the forward pass of its batch, `wait` the wait for the model and the batch, `app` all of it, from the ASGI
middleware's first look to the response). Overload: beyond `max_ongoing_requests` at work per replica a request
waits, beyond `max_queued_requests` waiting it gets 429 with Retry-After (serve/api.py).
"""

# no `from __future__ import annotations`: FastAPI reads the route signatures' request models at runtime

import asyncio
import json
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from raytune_ft.config.schema import CAUSAL_TASKS, ServeConfig
from raytune_ft.export import METADATA
from raytune_ft.serve.api import (
    BATCH_SIZE_HEADER,
    CHAT,
    CLASSIFY,
    COMPLETIONS,
    HEALTH,
    MODELS,
    REPLICA_HEADER,
    SERVER_TIMING,
    Admission,
    ApiError,
    ChatCompletionResponse,
    ClassifyResponse,
    CompletionResponse,
    Health,
    ModelList,
    build_api,
    classify_model,
    error_responses,
)
from raytune_ft.serve.generate import generation_models
from raytune_ft.serve.model import ExportError, find_export

APP_NAME = "raytune_ft"


def deployment_options(settings: ServeConfig) -> dict[str, Any]:
    scaling = settings.autoscaling
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        # every request reaches a replica, whose admission (serve/api.py) answers 429 in JSON; Serve's own
        # backpressure (429, plain text) is left for bursts beyond that
        "max_ongoing_requests": _replica_capacity(settings),
        "max_queued_requests": _replica_capacity(settings),
        "backpressure_config": {"status_code": 429, "retry_after_s": settings.retry_after_s},
        "health_check_period_s": settings.health_check_period_s,
        # a replica asked to stop (serve stop, a redeploy, a downscale) checks for requests still in flight at
        # this interval until none are left (or Serve's 20 s graceful timeout): at Ray's default 2 s, an idle
        # replica took 2 s to stop; every stop and every redeploy waited for it
        "graceful_shutdown_wait_loop_s": 0.2,
    }
    if scaling.max_replicas > scaling.min_replicas:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
        }
    else:
        options["num_replicas"] = scaling.min_replicas
    return options


def _replica_capacity(settings: ServeConfig) -> int:
    queued = settings.max_queued_requests if settings.max_queued_requests >= 0 else 10_000
    return settings.max_ongoing_requests + queued + 64


def build_app(exports: Path | list[Path], settings: ServeConfig, api_key: str | None = None) -> Any:
    """The Serve application for EXPORTS: one export (or a run directory holding one), served as it is; or several
    LoRA exports of one base model (or folders of them), served as adapters on that base (ServeError-like
    ExportError at once when one is not an adapter of the same base)."""
    from fastapi import Response
    from ray import serve

    paths = [Path(p) for p in (exports if isinstance(exports, list | tuple) else [exports])]
    if len(paths) == 1 and _holds_export(paths[0]):
        export = find_export(paths[0]).resolve()
        meta = json.loads((export / METADATA).read_text())
        served: list[Any] = [str(export)]
        title, tasks = export.name, {meta["task"]}
        # a multi-task export: a classify request may name any classification task (the primary included)
        classify_tasks = tuple(t["name"] for t in meta.get("tasks", []) if t["task"] == "sequence-classification")
    else:
        from raytune_ft.serve.adapters import adapter_exports

        served = adapter_exports(paths)  # refused here, before anything is deployed
        title, tasks, classify_tasks = f"{len(served)} adapters", {e.task for e in served}, ()
    classifies = bool(tasks - set(CAUSAL_TASKS)) or bool(classify_tasks)
    generates = bool(tasks & set(CAUSAL_TASKS))
    admission = Admission(settings.max_ongoing_requests, settings.max_queued_requests, settings.retry_after_s)
    api = build_api(f"raytune-ft: {title}", api_key, settings.limits, admission, settings.public_docs)
    ClassifyRequest = classify_model(settings.limits, classify_tasks, set(CAUSAL_TASKS) >= tasks)
    ChatRequest, CompletionRequest = generation_models(settings.limits)
    # the answers in the OpenAPI schema (documentation only: the routes return dicts, not validated per request)
    POST_ERRORS = error_responses(400, 401, 404, 413, 415, 422, 429, 500)
    max_prompt = settings.limits.max_prompt_tokens

    @serve.deployment(name="model", **deployment_options(settings))
    @serve.ingress(api)
    class ModelServer:
        def __init__(self, served: list[Any], max_batch_size: int, batch_wait_timeout_s: float, threads: int) -> None:
            from raytune_ft.serve.served import ManyAdapters, OneExport

            if isinstance(served[0], str):
                self.models: Any = OneExport(Path(served[0]), settings, threads)
            else:
                self.models = ManyAdapters(served, settings, threads)
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.classify_batch.set_max_batch_size(max_batch_size)
            self.classify_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
            self.model_free = asyncio.Event()
            self.model_free.set()

        def check_health(self) -> None:
            if not self.models.ready():
                raise RuntimeError("the model is not loaded")

        @serve.multiplexed(max_num_models_per_replica=settings.max_adapters_per_replica)
        async def adapter(self, adapter_id: str) -> Any:
            from raytune_ft.serve.served import Lease

            await asyncio.to_thread(self.models.load, adapter_id)
            return Lease(self.models, adapter_id)

        def target(self, named: str | None) -> Any:
            """The model a request asks for: Serve's multiplexing header, else the body's `model`."""
            header = serve.get_multiplexed_model_id() if self.models.multiplexed else ""
            if header and named and header != named:
                raise ApiError(
                    400,
                    f"the serve_multiplexed_model_id header says '{header}' and the body's model '{named}'",
                    "invalid_request",
                    "model",
                )
            return self.models.resolve(header or named)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)  # both set from the config in __init__
        async def classify_batch(self, items: list[tuple[str | None, str]]) -> list[tuple[dict, int, float]]:
            self.model_free.clear()
            started = time.perf_counter()
            try:
                # a worker thread: requests keep arriving (and are validated) during the forward pass
                predictions = await asyncio.to_thread(self.models.classify_items, items)
            finally:
                self.model_free.set()
            forward_ms = 1000 * (time.perf_counter() - started)
            return [(p, len(items), forward_ms) for p in predictions]

        @api.get(HEALTH, response_model=None, responses={200: {"model": Health}, **error_responses(500)})
        async def healthz(self) -> dict:
            engine = self.models.engine
            return {"status": "ok", "model": self.models.name, "generation": engine.stats() if engine else None}

        @api.get(MODELS, response_model=None, responses={200: {"model": ModelList}, **error_responses(401, 500)})
        async def models_route(self) -> dict:
            return {"object": "list", "data": self.models.models()}

        if classifies:

            @api.post(CLASSIFY, response_model=None, responses={200: {"model": ClassifyResponse}, **POST_ERRORS})
            async def classify(self, body: ClassifyRequest, response: Response) -> dict:  # type: ignore[valid-type]
                started = time.perf_counter()
                target = self.target(body.model)
                if target.generates and not classify_tasks:
                    raise ApiError(
                        400,
                        f"model '{target.id}' is a {target.task} model: use /v1/chat/completions or /v1/completions",
                        "invalid_request",
                        "model",
                    )
                texts = [body.text] if isinstance(body.text, str) else list(body.text)
                key = target.key if self.models.multiplexed else getattr(body, "task", None)
                await self.models.acquire(target, self.adapter)
                try:
                    # Texts join the batch queue only while the model is free: serve.batch closes a batch as soon
                    # as its wait timeout ends, even while the previous batch still runs, so texts that arrive
                    # during a forward pass would form small batches queued behind it. Held here, they all enter
                    # together when it ends and make one full batch; a lone request on an idle model goes in.
                    await self.model_free.wait()
                    results = await asyncio.gather(*(self.classify_batch((key, text)) for text in texts))
                finally:
                    self.models.release(target)
                response.headers[BATCH_SIZE_HEADER] = str(max(size for _, size, _ in results))
                response.headers[REPLICA_HEADER] = self.replica
                model_ms = max(ms for _, _, ms in results)
                wait_ms = max(0.0, 1000 * (time.perf_counter() - started) - model_ms)
                response.headers[SERVER_TIMING] = f"model;dur={model_ms:.2f}, wait;dur={wait_ms:.2f}"
                return {"predictions": [prediction for prediction, _, _ in results]}

        if generates:

            @api.post(CHAT, response_model=None, responses={200: {"model": ChatCompletionResponse}, **POST_ERRORS})
            async def chat(self, body: ChatRequest) -> Any:  # type: ignore[valid-type]
                return await self.generate(body, body.conversation(), None)

            @api.post(COMPLETIONS, response_model=None, responses={200: {"model": CompletionResponse}, **POST_ERRORS})
            async def completions(self, body: CompletionRequest) -> Any:  # type: ignore[valid-type]
                return await self.generate(body, None, body.prompt)

        async def generate(self, body: Any, messages: list[dict] | None, prompt: str | None) -> Any:
            from fastapi.responses import StreamingResponse

            from raytune_ft.serve.generate import (
                SSE_HEADERS,
                chat_answer,
                complete,
                completion_answer,
                events,
                pieces,
            )
            from raytune_ft.serve.served import render_prompt

            target = self.target(body.model)
            if not target.generates:
                route = "/v1/classify"
                raise ApiError(400, f"model '{target.id}' is a classifier: use {route}", "invalid_request", "model")
            prompt_ids = render_prompt(target, messages, prompt)
            self.check_context(len(prompt_ids), body.limit(), "messages" if messages is not None else "prompt")
            chat = messages is not None
            await self.models.acquire(target, self.adapter)
            source = pieces(self.models.engine, target.tokenizer, prompt_ids, body, target.key, target.stop_ids)
            if not body.stream:
                try:
                    done = await complete(source)
                finally:
                    self.models.release(target)
                return (chat_answer if chat else completion_answer)(target.id, done)
            usage = bool(body.stream_options and body.stream_options.include_usage)

            released = threading.Event()

            def release() -> None:
                if not released.is_set():
                    released.set()
                    self.models.release(target)

            async def stream() -> Any:
                try:
                    async for event in events(source, target.id, chat, usage):
                        yield event
                finally:
                    release()

            body_iterator = stream()
            # a client gone before the first byte: the stream never starts, and its finally never runs
            weakref.finalize(body_iterator, release)
            return StreamingResponse(body_iterator, media_type="text/event-stream", headers=SSE_HEADERS)

        def check_context(self, prompt_tokens: int, max_tokens: int, param: str) -> None:
            context = self.models.context
            if prompt_tokens > max_prompt:
                raise ApiError(
                    400,
                    f"the prompt is {prompt_tokens} tokens; this server takes at most {max_prompt} "
                    "(serve.limits.max_prompt_tokens)",
                    "context_length_exceeded",
                    param,
                )
            if context is not None and prompt_tokens + max_tokens > context:
                raise ApiError(
                    400,
                    f"this model's maximum context length is {context} tokens; the request asks for "
                    f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} to generate): "
                    "shorten the prompt or lower max_tokens",
                    "context_length_exceeded",
                    param,
                )

    threads = max(1, int(settings.num_cpus))
    return ModelServer.bind(served, settings.max_batch_size, settings.batch_wait_timeout_s, threads)


def _holds_export(path: Path) -> bool:
    try:
        find_export(path)
    except ExportError:
        return False
    return True


def build_noop_app() -> Any:
    """The plainest Serve deployment (`__call__` returns a constant): what `bench serve --baseline-noop` times to
    separate Ray Serve's own cost from the app's."""
    from ray import serve

    @serve.deployment(name="noop", max_ongoing_requests=1000)
    class Noop:
        async def __call__(self, request: Any) -> str:
            return "ok"

    return Noop.bind()
