"""Fuzzing the Serve app over real HTTP: hypothesis draws requests from the app's own OpenAPI schema (bodies from
its request schemas, by hypothesis-jsonschema) and from what breaks it (wrong types, extra fields, random JSON,
random bytes, lone surrogates, oversized texts and bodies, wrong methods, random paths, random content types).
Every answer is checked against what the schema says: no 5xx, every error is the JSON error body with its status
as code, every 2xx matches the documented answer (a stream: OpenAI's chunks, ending with [DONE]); afterwards the
replica still answers correctly. Both apps: a classifier's (/v1/classify) and a chat model's (/v1/completions and
/v1/chat/completions, streamed or not), each with /v1/models and /healthz.

The table of hand-picked bad requests is test_serve.py's; this file looks for the ones nobody picked."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import jsonschema
import pytest
import requests
from helpers import with_serve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from raytune_ft.serve.deploy import deploy
from raytune_ft.serve.model import LoadedModel, export_config

pytestmark = pytest.mark.integration

# small, so that fuzzing reaches them (max_tokens also keeps generation short)
LIMITS = {"max_items": 8, "max_text_chars": 300, "max_body_bytes": 4000, "max_tokens": 4}
TEXT_FIELD = {"/v1/classify": "text", "/v1/completions": "prompt", "/v1/chat/completions": "messages"}
# generation takes what OpenAI clients send: unknown fields, and pydantic's lax coercions ("3" for 3, true for 1.0)
LAX_ROUTES = {"/v1/completions", "/v1/chat/completions"}
# a valid generation request may still be refused once its prompt is tokenised: over the model's context (400)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "FETCH"]  # HEAD: answers have no body
# A method the HTTP parser does not know never reaches the app: Serve's proxy (uvicorn) refuses it in plain text.
UNPARSED = {"FETCH"}
JSON_TYPES = ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/problem+json"]
OTHER_TYPES = [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "*/*"]


@pytest.fixture(scope="module")
def served(classifier):
    """test_serve's tiny BERT export, deployed with small request limits: (export, port, URL)."""
    export, cfg = classifier
    cfg = with_serve(cfg, **{f"limits__{key}": value for key, value in LIMITS.items()})
    return export, cfg.serve.port, deploy(export, cfg)


@pytest.fixture(scope="module")
def chat_served(chat_run, served):
    """The session's chat export, deployed in place of the classifier (the same port), with the same small
    limits: (export, URL)."""
    export = chat_run[0].export_dir
    overrides = [f"serve.port={served[1]}", *(f"serve.limits.{key}={value}" for key, value in LIMITS.items())]
    return export, deploy(export, export_config(export, overrides))


def inline_refs(node: Any, components: dict[str, Any]) -> Any:
    """NODE with every `$ref` to `#/components/schemas/NAME` replaced by that schema (FastAPI's are not recursive)."""
    if isinstance(node, dict):
        if "$ref" in node:
            return inline_refs(components[node["$ref"].rsplit("/", 1)[-1]], components)
        return {key: inline_refs(value, components) for key, value in node.items()}
    if isinstance(node, list):
        return [inline_refs(value, components) for value in node]
    return node


@dataclass(frozen=True)
class Operation:
    body: dict | None  # the request body's JSON schema
    answers: dict[int, dict]  # status -> the JSON schema of its answer


def operations(openapi: dict) -> dict[tuple[str, str], Operation]:
    components = openapi["components"]["schemas"]
    ops = {}
    for path, methods in openapi["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            answers = {
                int(status): inline_refs(answer["content"]["application/json"]["schema"], components)
                for status, answer in op["responses"].items()
            }
            ops[method.upper(), path] = Operation(inline_refs(body, components) if body else None, answers)
    return ops


@dataclass(frozen=True)
class Req:
    kind: str
    method: str
    path: str
    content_type: str | None = None
    body: bytes | None = None


def encode(value: Any, ascii_only: bool) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=ascii_only).encode()
    except UnicodeEncodeError:  # a lone surrogate: only as a \u escape
        return json.dumps(value).encode()


def json_values() -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)
    )


def odd_text() -> st.SearchStrategy[str]:
    """Text a client should not send but might: lone surrogates, control characters, NUL, blanks, long runs."""
    surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
    anything = st.characters(codec=None, exclude_categories=())
    blank = st.sampled_from([" ", "\t", "\n", "\u00a0", "\u2003", "\u3000", "\x1c"])
    short = st.text(st.one_of(anything, surrogate, blank), min_size=0, max_size=40)
    long = st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "😀", " ", "\x00"]), st.integers(200, 1200))
    return short | long


def request_strategies(ops: dict[tuple[str, str], Operation]) -> dict[str, st.SearchStrategy[Req]]:
    """Kind of request -> its strategy: "schema" (requests by the schema), then the kinds that break it."""
    routes = sorted({path for _, path in ops})
    with_body = sorted(key for key, op in ops.items() if op.body)
    valid_bodies = {key: from_schema(ops[key].body) for key in with_body}
    content_types = st.one_of(
        st.sampled_from(JSON_TYPES + OTHER_TYPES),
        st.from_regex(r"[a-zA-Z0-9+.*-]{1,12}/[a-zA-Z0-9+.*-]{1,12}(; ?[a-z]{1,8}=[a-zA-Z0-9-]{0,8})?", fullmatch=True),
    )

    def body_request(kind: str, make: Any) -> st.SearchStrategy[Req]:
        """KIND requests to each route that takes a body: MAKE(valid body strategy, the route's text field, its
        fields) -> strategy of JSON values."""
        per_route = [
            st.builds(
                lambda value, ascii_only, ctype, m=method, p=path: Req(kind, m, p, ctype, encode(value, ascii_only)),
                make(valid_bodies[method, path], TEXT_FIELD[path], sorted(ops[method, path].body["properties"])),
                st.booleans(),
                st.sampled_from(JSON_TYPES[:1]) if kind != "content-type" else content_types,
            )
            for method, path in with_body
        ]
        return st.one_of(per_route)

    def replaced(value: dict, key: str, new: Any) -> dict:
        return {**value, key: new}

    def with_extra(value: dict, key: str, new: Any) -> dict:
        return {**value, key: new} if key not in value else value

    schema_gets = st.sampled_from([Req("schema", m, p) for (m, p), op in sorted(ops.items()) if not op.body])
    schema_posts = body_request("schema", lambda valid, *_: valid)
    wrong_type = body_request(
        "wrong-type",
        lambda valid, _, fields: st.builds(replaced, valid, st.sampled_from(fields), json_values()),
    )
    extra_field = body_request(
        "extra-field",
        lambda valid, *_: st.builds(with_extra, valid, st.text(max_size=10), json_values()),
    )
    random_json = body_request("random-json", lambda *_: json_values())
    odd_texts = body_request(
        "unicode",
        lambda _, field, __: st.builds(
            lambda t: {field: t}, odd_text() | st.lists(odd_text(), min_size=1, max_size=10)
        ),
    )
    huge = body_request(
        "huge",
        lambda _, field, __: st.builds(
            lambda n, many: {field: ["w " * (n // 2)] * many if many else "w " * (n // 2)},
            st.integers(LIMITS["max_text_chars"] - 10, 3 * LIMITS["max_body_bytes"]),
            st.integers(0, 2),
        ),
    )
    random_bytes = st.builds(
        lambda path, ctype, data: Req("random-bytes", "POST", path, ctype, data),
        st.sampled_from(routes),
        st.sampled_from(JSON_TYPES),
        st.binary(max_size=600),
    )
    wrong_method = st.builds(
        lambda method, path, data: Req("method", method, path, "application/json", data),
        st.sampled_from(METHODS),
        st.sampled_from(routes),
        st.none() | st.just(b'{"text": "a good film"}'),
    )
    near_routes = st.builds(
        lambda route, change: change(route),
        st.sampled_from(routes),
        st.sampled_from(
            [lambda r: r + "/", lambda r: r.upper(), lambda r: "/" + r, lambda r: r + "/x", lambda r: r[:-1]]
        ),
    )
    random_path = st.builds(
        lambda method, path, data: Req("path", method, path, "application/json", data),
        st.sampled_from(["GET", "POST"]),
        near_routes | st.text(max_size=30).map(lambda text: "/" + quote(text, safe="/")),
        st.none() | st.just(b'{"text": "a good film"}'),
    )
    return {
        "schema": schema_gets | schema_posts,
        "wrong-type": wrong_type,
        "extra-field": extra_field,
        "random-json": random_json,
        "unicode": odd_texts,
        "huge": huge,
        "random-bytes": random_bytes,
        "method": wrong_method,
        "path": random_path,
        "content-type": body_request("content-type", lambda valid, *_: valid),
    }


def has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return any(has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in value.items())
    return False


def expected(req: Req, ops: dict[tuple[str, str], Operation]) -> set[int]:
    """The statuses the schema and the documented rules (README, Serving: Errors) allow for REQ."""
    if req.body is not None and len(req.body) > LIMITS["max_body_bytes"]:
        return {413}  # from Content-Length, before the route is looked at
    op = ops.get((req.method, req.path))
    if op is None:
        return {405} if any(path == req.path for _, path in ops) else {404}
    if op.body is None:
        return {200}
    kind = (req.content_type or "").split(";")[0].strip().lower()
    if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        return {415}
    try:
        value = json.loads((req.body or b"").decode("utf-8"))
    except ValueError:  # not UTF-8, or not JSON (an empty body is a missing one: 422)
        return {400, 422}
    if has_surrogate(value) or not jsonschema.Draft202012Validator(op.body).is_valid(value):
        return {200, 400, 422} if req.path in LAX_ROUTES and not has_surrogate(value) else {422}
    if req.path in LAX_ROUTES:
        from raytune_ft.serve.generate import UNSUPPORTED

        if any(value.get(k) is not None and value.get(k) != nothing for k, nothing in UNSUPPORTED.items()):
            return {422}  # an OpenAI feature this server does not have, sent as an extra field
        return {200, 400}
    return {200}


def check(req: Req, answer: requests.Response, ops: dict[tuple[str, str], Operation]) -> None:
    status = answer.status_code
    if req.method in UNPARSED:
        assert (status, answer.text) == (400, "Invalid HTTP request received."), (req, status, answer.text[:500])
        return
    assert status < 500, (req, status, answer.text[:500])
    allowed = expected(req, ops)
    assert status in allowed, (req, status, allowed, answer.text[:500])
    if status == 200 and answer.headers.get("content-type", "").startswith("text/event-stream"):
        check_stream(req, answer)
        return
    assert answer.headers.get("content-type", "").startswith("application/json"), (req, status, answer.headers)
    payload = answer.json()
    if 200 <= status < 300:
        jsonschema.validate(payload, ops[req.method, req.path].answers[status])
        if req.path == "/v1/classify":
            text = json.loads(req.body)["text"]
            assert len(payload["predictions"]) == (1 if isinstance(text, str) else len(text))
        if req.path in LAX_ROUTES:
            usage = payload["usage"]
            assert len(payload["choices"]) == 1 and usage["completion_tokens"] <= LIMITS["max_tokens"], payload
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], payload
    else:
        assert set(payload) == {"error"} and payload["error"]["code"] == status, (req, payload)
        if status == 400 and req.path in LAX_ROUTES and req.kind != "random-bytes":
            assert payload["error"]["type"] in ("context_length_exceeded", "invalid_json"), payload
        assert isinstance(payload["error"]["message"], str) and payload["error"]["message"], (req, payload)
        documented = ops.get((req.method, req.path))
        if documented and status in documented.answers:
            jsonschema.validate(payload, documented.answers[status])


def check_stream(req: Req, answer: requests.Response) -> None:
    """A streamed answer: server-sent events of one completion's chunks, ending with [DONE], no error event."""
    events = [line for line in answer.text.split("\n\n") if line]
    assert events and all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]", (req, events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all("error" not in c for c in chunks), (req, chunks)
    kind = "chat.completion.chunk" if req.path == "/v1/chat/completions" else "text_completion"
    assert {c["object"] for c in chunks} == {kind} and len({c["id"] for c in chunks}) == 1, (req, chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length"), (req, chunks)


def fuzz(url: str, valid_examples: int, broken_examples: int) -> tuple[Counter[int], requests.Session]:
    """VALID_EXAMPLES requests by URL's OpenAPI schema, then BROKEN_EXAMPLES of each kind that breaks it, each
    answer checked; the statuses seen (one summary line printed) and the client."""
    client = requests.Session()  # one kept-alive connection
    ops = operations(client.get(f"{url}/openapi.json", timeout=30).json())
    statuses: Counter[int] = Counter()
    kinds: Counter[str] = Counter()

    def run(strategy: st.SearchStrategy[Req], examples: int) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,  # the same requests on every run
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )
        @given(strategy)
        def one(req: Req) -> None:
            headers = {"Content-Type": req.content_type} if req.content_type is not None else {}
            answer = client.request(
                req.method, url + req.path, data=req.body, headers=headers, timeout=60, allow_redirects=False
            )
            statuses[answer.status_code] += 1
            kinds[req.kind] += 1
            check(req, answer, ops)

        one()

    strategies = request_strategies(ops)
    started = time.perf_counter()
    run(strategies.pop("schema"), valid_examples)
    valid_ok = statuses[200]
    for strategy in strategies.values():  # each kind on its own: all of them get their share
        run(strategy, broken_examples)
    elapsed = time.perf_counter() - started
    total = sum(statuses.values())
    print(
        f"\nfuzz {sorted({path for _, path in ops})}: {total} requests in {elapsed:.1f} s; "
        f"statuses {dict(sorted(statuses.items()))}; kinds {dict(sorted(kinds.items()))}"
    )
    assert set(kinds) == {"schema", *strategies} and valid_ok >= valid_examples * 2 // 3, (kinds, statuses)
    assert client.get(f"{url}/healthz", timeout=30).status_code == 200
    return statuses, client


def test_fuzzed_classify_requests_get_no_5xx_and_the_documented_answers(served):
    export, _, url = served
    statuses, client = fuzz(url, valid_examples=150, broken_examples=30)
    assert sum(statuses.values()) >= 300
    # still right
    texts = ["the good film", "a bad movie", "number 7 is good"]
    answer = client.post(f"{url}/v1/classify", json={"text": texts}, timeout=30)
    assert answer.status_code == 200
    want = LoadedModel(export).classify(texts)
    got = answer.json()["predictions"]
    assert [p["label"] for p in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["probs"] == pytest.approx(w["probs"], abs=1e-5)


def test_fuzzed_generation_requests_get_no_5xx_and_the_documented_answers(chat_served):
    export, url = chat_served
    _, client = fuzz(url, valid_examples=80, broken_examples=12)
    # still right: greedy decoding gives what the export gives in-process
    answer = client.post(f"{url}/v1/completions", json={"prompt": "the film", "max_tokens": 4, "temperature": 0})
    assert answer.status_code == 200
    want = LoadedModel(export).complete("the film", 4, 0.0, 1.0, None)
    assert answer.json()["choices"][0]["text"] == want["text"]
