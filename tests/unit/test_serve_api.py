"""The serving API's guard and error handler, called as the ASGI application uvicorn and Serve call (no Ray, no
socket): every route but /healthz behind the API key, and a bug answered with a request id, not its text."""

from __future__ import annotations

import asyncio
import json
import logging

from raytune_ft.config.schema import RequestLimits
from raytune_ft.serve.api import HEALTH, Admission, build_api


def call(app, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """GET PATH; (status, JSON body)."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
    }
    try:
        asyncio.run(app(scope, receive, send))
    except RuntimeError as exc:  # Starlette answers a bug's 500, then re-raises it for the server to log
        assert sent, exc
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body) if body else {}


def api(api_key: str | None = "k3y", public_docs: bool = False):
    app = build_api("t", api_key, RequestLimits(), Admission(4, 4, 1.0), public_docs)

    @app.get(HEALTH)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/added-later")  # a route nobody listed for the guard
    async def added() -> dict:
        return {"ok": True}

    @app.get("/v1/bug")
    async def bug() -> dict:
        raise RuntimeError("the secret path /srv/models/private and the input 'card 4111'")

    return app


def test_every_route_but_the_health_check_needs_the_key():
    app = api()
    key = {"Authorization": "Bearer k3y"}
    assert call(app, HEALTH)[0] == 200
    for path in ("/v1/added-later", "/docs", "/openapi.json", "/nowhere"):
        status, body = call(app, path)
        assert status == 401 and body["error"]["type"] == "auth", path
    assert call(app, "/v1/added-later", key) == (200, {"ok": True})
    assert call(app, "/nowhere", key)[0] == 404
    assert call(app, "/v1/added-later", {"Authorization": "Bearer wrong"})[0] == 401
    # the docs open only when asked for, and nothing else with them
    public = api(public_docs=True)
    assert call(public, "/openapi.json")[0] == 200 and call(public, "/v1/added-later")[0] == 401
    # no key configured: nothing is guarded
    assert call(api(api_key=None), "/v1/added-later")[0] == 200


def test_a_bug_is_answered_with_a_request_id_and_logged_with_its_traceback(caplog):
    caplog.set_level(logging.ERROR, logger="ray.serve")
    status, body = call(api(api_key=None), "/v1/bug")
    message = body["error"]["message"]
    assert status == 500 and body["error"]["type"] == "internal_error"
    assert "secret" not in message and "4111" not in message and "RuntimeError" not in message
    request_id = message.split("request id ")[1].split(")")[0]
    [record] = [r for r in caplog.records if request_id in r.getMessage()]
    assert "GET /v1/bug" in record.getMessage() and "the secret path" in str(record.exc_info[1])
