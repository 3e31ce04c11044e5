"""The Ray Serve application: one deployment with a FastAPI ingress serving one exported model.

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
import time
import uuid
from pathlib import Path
from typing import Any

from raytune_ft.config.schema import CAUSAL_TASKS, ServeConfig
from raytune_ft.export import METADATA
from raytune_ft.serve.api import (
    BATCH_SIZE_HEADER,
    CLASSIFY,
    COMPLETIONS,
    HEALTH,
    MODELS,
    REPLICA_HEADER,
    SERVER_TIMING,
    Admission,
    ClassifyResponse,
    CompletionResponse,
    Health,
    ModelList,
    build_api,
    error_responses,
    request_models,
)
from raytune_ft.serve.model import find_export

APP_NAME = "raytune_ft"


def task_of(export_dir: Path) -> str:
    return json.loads((find_export(export_dir) / METADATA).read_text())["task"]


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


def build_app(export_dir: Path, settings: ServeConfig, api_key: str | None = None) -> Any:
    """The Serve application for EXPORT_DIR (an export, or a run directory holding one)."""
    from fastapi import Response
    from ray import serve

    export_dir = find_export(Path(export_dir)).resolve()
    task = task_of(export_dir)
    admission = Admission(settings.max_ongoing_requests, settings.max_queued_requests, settings.retry_after_s)
    api = build_api(f"raytune-ft: {export_dir.name}", api_key, settings.limits, admission, settings.public_docs)
    meta = json.loads((export_dir / METADATA).read_text())
    # a multi-task export: a classify request may name any classification task (the primary included)
    classify_tasks = tuple(t["name"] for t in meta.get("tasks", []) if t["task"] == "sequence-classification")
    ClassifyRequest, CompletionRequest = request_models(settings.limits, classify_tasks, task in CAUSAL_TASKS)
    # the answers in the OpenAPI schema (documentation only: the routes return dicts, not validated per request)
    POST_ERRORS = error_responses(400, 401, 413, 415, 422, 429, 500)

    @serve.deployment(name="model", **deployment_options(settings))
    @serve.ingress(api)
    class ModelServer:
        def __init__(
            self, path: str, max_batch_size: int, batch_wait_timeout_s: float, threads: int, dtype: str
        ) -> None:
            from raytune_ft.serve.model import LoadedModel

            self.model = LoadedModel(Path(path), num_threads=threads, dtype=dtype)
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.classify_batch.set_max_batch_size(max_batch_size)
            self.classify_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
            self.generating = asyncio.Lock()
            self.model_free = asyncio.Event()
            self.model_free.set()

        def check_health(self) -> None:
            if self.model.model is None:
                raise RuntimeError("the model is not loaded")

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)  # both set from the config in __init__
        async def classify_batch(self, items: list[tuple[str | None, str]]) -> list[tuple[dict, int, float]]:
            self.model_free.clear()
            started = time.perf_counter()
            try:
                # a worker thread: requests keep arriving (and are validated) during the forward pass
                predictions = await asyncio.to_thread(self.model.classify_items, items)
            finally:
                self.model_free.set()
            forward_ms = 1000 * (time.perf_counter() - started)
            return [(p, len(items), forward_ms) for p in predictions]

        @api.get(HEALTH, response_model=None, responses={200: {"model": Health}, **error_responses(500)})
        async def healthz(self) -> dict:
            return {"status": "ok", "model": self.model.name}

        @api.get(MODELS, response_model=None, responses={200: {"model": ModelList}, **error_responses(401, 500)})
        async def models(self) -> dict:
            info = self.model.info()
            info["experiment"] = self.model.meta.get("experiment", {}).get("name")
            return {"object": "list", "data": [info]}

        if task not in CAUSAL_TASKS or classify_tasks:

            @api.post(CLASSIFY, response_model=None, responses={200: {"model": ClassifyResponse}, **POST_ERRORS})
            async def classify(self, body: ClassifyRequest, response: Response) -> dict:  # type: ignore[valid-type]
                started = time.perf_counter()
                texts = [body.text] if isinstance(body.text, str) else list(body.text)
                # Texts join the batch queue only while the model is free: serve.batch closes a batch as soon as
                # its wait timeout ends, even while the previous batch still runs, so texts that arrive during a
                # forward pass would form small batches queued behind it. Held here, they all enter together
                # when it ends and make one full batch; a lone request on an idle model goes straight in.
                await self.model_free.wait()
                named = getattr(body, "task", None)
                results = await asyncio.gather(*(self.classify_batch((named, text)) for text in texts))
                response.headers[BATCH_SIZE_HEADER] = str(max(size for _, size, _ in results))
                response.headers[REPLICA_HEADER] = self.replica
                model_ms = max(ms for _, _, ms in results)
                wait_ms = max(0.0, 1000 * (time.perf_counter() - started) - model_ms)
                response.headers[SERVER_TIMING] = f"model;dur={model_ms:.2f}, wait;dur={wait_ms:.2f}"
                return {"predictions": [prediction for prediction, _, _ in results]}

        if task in CAUSAL_TASKS:  # a chat model completes raw text too (its own template is up to the client)

            @api.post(COMPLETIONS, response_model=None, responses={200: {"model": CompletionResponse}, **POST_ERRORS})
            async def completions(self, body: CompletionRequest) -> dict:  # type: ignore[valid-type]
                async with self.generating:  # one generate() at a time per replica
                    out = await asyncio.to_thread(
                        self.model.complete, body.prompt, body.max_tokens, body.temperature, body.top_p, body.seed
                    )
                return {
                    "id": f"cmpl-{uuid.uuid4().hex}",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": self.model.name,
                    "choices": [
                        {"text": out["text"], "index": 0, "logprobs": None, "finish_reason": out["finish_reason"]}
                    ],
                    "usage": {
                        "prompt_tokens": out["prompt_tokens"],
                        "completion_tokens": out["completion_tokens"],
                        "total_tokens": out["prompt_tokens"] + out["completion_tokens"],
                    },
                }

    threads = max(1, int(settings.num_cpus))
    return ModelServer.bind(
        str(export_dir), settings.max_batch_size, settings.batch_wait_timeout_s, threads, settings.dtype
    )


def build_noop_app() -> Any:
    """The plainest Serve deployment (`__call__` returns a constant): what `bench serve --baseline-noop` times to
    separate Ray Serve's own cost from the app's."""
    from ray import serve

    @serve.deployment(name="noop", max_ongoing_requests=1000)
    class Noop:
        async def __call__(self, request: Any) -> str:
            return "ok"

    return Noop.bind()
