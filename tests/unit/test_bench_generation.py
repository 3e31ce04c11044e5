"""`bench serve` of a generation server: the SSE parser and each streamed request's timing against a real local
HTTP server (aiohttp.web in a thread) that streams known chunks after known delays, fails in each way a stream
can, and plays a multiplexed server with adapters; the level arithmetic on synthetic timings; the whole benchmark
and the CLI against that server; the in-process floor on a tiny Llama chat export."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from raytune_ft.bench.generation import (
    MULTIPLEX_HEADER,
    GenerationClient,
    SSEParser,
    Streamed,
    adapters_to_bench,
    bench_generation,
    generation_stats,
    request_body,
    summarize_generation,
)

# the "ok" stream: text after these delays (s) from the request; the usage says 5 tokens in 3 text events
FIRST_S, GAPS_S = 0.15, (0.05, 0.10)
COLD_S = 0.25  # an adapter's first request waits this long (its load)
SLACK_S = 0.30  # what a busy 2-core machine may add to a delay; delays are checked from below exactly


def chunk(chat: bool, text: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    if chat:
        delta = {"content": text} if text is not None else {}
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        payload = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
        payload = {"id": "c1", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
    payload.update(extra)
    return f"data: {json.dumps(payload)}\n\n".encode()


USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


class FakeServer:
    """An OpenAI-like generation server on a free port, its own event loop in a thread. The scenario is the
    request's text: ok, error, broken, nodone, garbage, status, crlf."""

    def __init__(self, models: list[dict[str, Any]]) -> None:
        from aiohttp import web

        self.models = models
        self.seen: dict[str, int] = {}  # adapter id -> requests
        app = web.Application()
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/classify", self.classify)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        ready = threading.Event()

        async def start() -> None:
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", 0).start()
            self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
            ready.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop)
        assert ready.wait(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def list_models(self, request: Any) -> Any:
        from aiohttp import web

        listed = [{**m, "loaded": m["id"] in self.seen} for m in self.models]
        return web.json_response({"object": "list", "data": listed})

    async def adapter_wait(self, request: Any) -> None:
        adapter = request.headers.get(MULTIPLEX_HEADER)
        if adapter:
            await asyncio.sleep(0.01 if adapter in self.seen else COLD_S)
            self.seen[adapter] = self.seen.get(adapter, 0) + 1

    async def classify(self, request: Any) -> Any:
        from aiohttp import web

        await self.adapter_wait(request)
        return web.json_response({"predictions": [{"label": "pos", "label_id": 1, "probs": {"pos": 1.0}}]})

    async def generate(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        chat = request.path.endswith("/chat/completions")
        scenario = body["messages"][-1]["content"] if chat else body["prompt"]
        await self.adapter_wait(request)
        if scenario == "status":
            error = {"message": "overloaded", "type": "overloaded", "param": None, "code": 503}
            return web.json_response({"error": error}, status=503)
        if not body.get("stream"):
            return web.json_response({"choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if chat:
            await response.write(
                f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n".encode()
            )
        if scenario == "crlf":  # CRLF line endings, a comment, two events in one write, one split across writes
            event = chunk(chat, "x").replace(b"\n", b"\r\n")
            await response.write(b": keep-alive\r\n\r\n" + event + event[:10])
            await asyncio.sleep(0.05)
            await response.write(event[10:] + b"data: [DONE]\r\n\r\n")
            return response
        await asyncio.sleep(FIRST_S)
        await response.write(chunk(chat, "Hel"))
        if scenario == "error":
            error = {"message": "the engine failed", "type": "engine_error", "code": 500}
            await response.write(f"data: {json.dumps({'error': error})}\n\n".encode())
            return response
        if scenario == "broken":
            await asyncio.sleep(0.02)
            request.transport.close()
            return response
        if scenario == "garbage":
            await response.write(b"data: {not json\n\n")
            return response
        for gap, text in zip(GAPS_S, ("lo", " there"), strict=True):
            await asyncio.sleep(gap)
            await response.write(chunk(chat, text))
        await response.write(chunk(chat, None, "length"))
        if scenario == "nodone":
            return response
        if body.get("stream_options", {}).get("include_usage"):
            await response.write(f"data: {json.dumps({'choices': [], 'usage': USAGE})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


MODELS = [
    {"id": "tiny-chat", "task": "chat", "export_dir": "/nonexistent/export", "threads": 1},
    {"id": "chat-lora", "task": "chat", "adapter": True},
    {"id": "sentiment-lora", "task": "sequence-classification", "adapter": True},
]


@pytest.fixture(scope="module")
def server():
    fake = FakeServer(MODELS)
    yield fake
    fake.close()


def stream_all(url: str, route: str, bodies: list[bytes]) -> list[Streamed]:
    async def main() -> list[Streamed]:
        async with GenerationClient(url, None, 8) as client:
            return list(await asyncio.gather(*(client.stream(route, body) for body in bodies)))

    return asyncio.run(main())


# --- the SSE parser


def test_sse_parser_joins_lines_skips_comments_and_keeps_a_split_event():
    parser = SSEParser()
    assert parser.feed(b": comment\n\ndata: one\r\n\r\ndata: tw") == ["one"]
    assert parser.feed(b"o\ndata: lines\n") == []
    assert parser.feed(b"event: ignored\nid: 3\n\ndata:[DONE]") == ["two\nlines"]
    assert parser.close() == ["[DONE]"]  # a last event without its blank line
    assert parser.close() == []


# --- each request's timing and failures, on a real server


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_a_stream_is_timed_from_sending_to_first_text_between_texts_and_to_done(server, chat):
    route = "/v1/chat/completions" if chat else "/v1/completions"
    started = time.perf_counter()
    [r] = stream_all(server.url, route, [request_body("chat" if chat else "causal-lm", "m", "ok", 5)])
    wall = time.perf_counter() - started
    assert r.ok and r.error == "" and r.done
    assert r.chunks == 3 and r.completion_tokens == 5 and r.tokens == 5  # the usage's count wins
    assert r.finish_reason == "length"
    # the role chunk came at once, but TTFT waits for text
    assert FIRST_S - 0.002 <= r.ttft_s <= FIRST_S + SLACK_S
    # each text arrives no sooner than the server sent it (a late arrival shortens the gap after it, so the
    # arrival times are checked from below, the gaps only roughly)
    assert len(r.gaps_s) == 2
    assert r.ttft_s + r.gaps_s[0] >= FIRST_S + GAPS_S[0] - 0.002
    assert r.ttft_s + sum(r.gaps_s) >= FIRST_S + sum(GAPS_S) - 0.002
    for measured, gap in zip(r.gaps_s, GAPS_S, strict=True):
        assert 0 <= measured <= gap + SLACK_S
    assert r.ttft_s + sum(r.gaps_s) <= r.e2e_s <= wall


def test_each_way_a_stream_fails_is_an_error_of_its_kind(server):
    scenarios = ["error", "broken", "nodone", "garbage", "status"]
    records = stream_all(server.url, "/v1/chat/completions", [request_body("chat", "m", s, 5) for s in scenarios])
    kinds = {s: r.error for s, r in zip(scenarios, records, strict=True)}
    assert kinds == {
        "error": "error_event:engine_error",
        "broken": "broken_stream",
        "nodone": "broken_stream",  # ended without [DONE]: a truncated answer, not a complete one
        "garbage": "bad_event",
        "status": "503",
    }
    assert not any(r.ok for r in records)
    assert records[0].chunks == 1 and records[0].ttft_s >= FIRST_S - 0.002  # what came before the error counts


def test_crlf_events_in_any_packet_shape_parse(server):
    [r] = stream_all(server.url, "/v1/chat/completions", [request_body("chat", "m", "crlf", 5)])
    assert r.ok and r.chunks == 2 and r.completion_tokens is None and r.tokens == 2
    assert len(r.gaps_s) == 1 and r.e2e_s >= 0.05 - 0.002  # the second event's end came 50 ms after the first


def test_a_refused_connection_is_an_error_named_by_its_exception():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    [r] = stream_all(f"http://127.0.0.1:{port}", "/v1/completions", [request_body("causal-lm", "m", "ok", 5)])
    assert not r.ok and r.error == "ClientConnectorError"


# --- the level figures on synthetic timings


def streamed(ttft: float, gaps: list[float], e2e: float, tokens: int | None, chunks: int) -> Streamed:
    return Streamed(ok=True, ttft_s=ttft, gaps_s=gaps, e2e_s=e2e, completion_tokens=tokens, chunks=chunks, done=True)


def test_level_figures_from_known_timings():
    records = [
        streamed(0.100, [0.010, 0.020], 0.130, 10, 3),
        streamed(0.200, [0.030], 0.250, 6, 2),
        streamed(0.300, [], 0.300, None, 1),  # no usage: its text events count
        Streamed(error="503").end(0.01),
        Streamed(error="error_event:engine_error").end(0.05),
        Streamed(error="503").end(0.01),
    ]
    stats = generation_stats(records, wall_s=2.0)
    assert stats["requests"] == 6 and stats["errors"] == 3
    assert stats["error_kinds"] == {"503": 2, "error_event:engine_error": 1}
    assert stats["rps"] == pytest.approx(1.5)  # 3 answers in 2 s
    assert stats["output_tokens"] == 17 and stats["output_tokens_per_s"] == pytest.approx(8.5)
    assert stats["mean_output_tokens"] == pytest.approx(17 / 3)
    assert stats["without_usage"] == 1
    assert stats["ttft_p50_ms"] == pytest.approx(200.0) and stats["ttft_p99_ms"] == pytest.approx(300.0)
    # pooled gaps 10, 20, 30 ms
    assert stats["itl_p50_ms"] == pytest.approx(20.0) and stats["itl_p99_ms"] == pytest.approx(30.0)
    assert stats["e2e_p50_ms"] == pytest.approx(250.0) and stats["e2e_p99_ms"] == pytest.approx(300.0)
    assert stats["p50_ms"] == stats["e2e_p50_ms"] and stats["p95_ms"] == pytest.approx(300.0)  # a classifier's keys
    # time per output token after the first: (130-100)/9 and (250-200)/5 ms
    assert stats["tpot_p50_ms"] == pytest.approx(30 / 9)
    assert stats["finish_reasons"] == {"none": 3}


def test_a_level_of_only_errors_has_no_latencies():
    stats = generation_stats([Streamed(error="broken_stream").end(0.1)], wall_s=1.0)
    assert stats["errors"] == 1 and stats["rps"] == 0 and stats["output_tokens_per_s"] == 0
    assert stats["ttft_p50_ms"] is None and stats["itl_p99_ms"] is None and stats["mean_output_tokens"] is None


def test_summary_batching_gain_and_ttft_over_the_floor():
    def level(c: int, tps: float, ttft: float) -> dict[str, Any]:
        return {"concurrency": c, "output_tokens_per_s": tps, "ttft_p50_ms": ttft, "p50_ms": 10 * ttft, "errors": 1}

    floor = {"ttft_p50_ms": 12.0, "p50_ms": 300.0, "output_tokens_per_s_top": 400.0}
    result = summarize_generation([level(1, 50.0, 20.0), level(8, 200.0, 60.0)], floor)
    assert result["benchmark"] == "generation"
    assert result["batching_gain"] == pytest.approx(4.0)
    assert result["ttft_over_floor_ms"] == pytest.approx(8.0)
    assert result["overhead_ms"] == pytest.approx(-100.0)
    assert result["tokens_per_s_of_floor_top"] == pytest.approx(0.5)
    assert result["errors"] == 2
    bare = summarize_generation([level(4, 100.0, 30.0)], None)
    assert bare["batching_gain"] is None  # no concurrency-1 level to divide by
    assert bare["ttft_over_floor_ms"] is None and bare["floor"] is None


def test_which_adapters_are_timed():
    assert adapters_to_bench(MODELS, ["b", "a", "b"]) == ["b", "a"]
    assert adapters_to_bench(MODELS, None) == ["chat-lora", "sentiment-lora"]
    assert adapters_to_bench([{"id": "x"}, {"id": "y"}], None) == ["x", "y"]  # several, none flagged: all
    assert adapters_to_bench([{"id": "x"}], None) == []


# --- the whole benchmark, and the command, against the server


def test_the_benchmark_measures_levels_and_adapters_cold_then_warm(server, tmp_path):
    logs: list[str] = []
    result = bench_generation(
        server.url,
        MODELS[0],
        concurrency=[1, 3],
        requests=6,
        warmup=2,
        api_key=None,
        texts=["ok"],
        model=tmp_path,  # no export there: no floor, and the served figures stand
        max_tokens=5,
        adapter_requests=3,
        log=logs.append,
    )
    assert result["benchmark"] == "generation" and result["task"] == "chat" and result["model"] == "tiny-chat"
    assert result["endpoint"] == server.url + "/v1/chat/completions" and result["errors"] == 0
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 3]
    for lv in result["levels"]:
        assert lv["requests"] == 6 and lv["output_tokens"] == 30 and lv["mean_output_tokens"] == 5
        assert lv["ttft_p50_ms"] >= 1000 * FIRST_S - 2 and lv["itl_p50_ms"] >= 1000 * GAPS_S[0] / 2
        assert lv["ttft_p50_ms"] <= lv["e2e_p50_ms"] <= lv["e2e_p99_ms"]
        assert lv["output_tokens_per_s"] == pytest.approx(30 / lv["wall_s"])
    # three clients overlap their waits: more tokens per second than one
    assert result["batching_gain"] > 1.5
    assert result["floor"] is None and any(m.startswith("no in-process floor") for m in logs), logs
    chat, sentiment = result["adapters"]
    assert chat["id"] == "chat-lora" and chat["route"] == "/v1/chat/completions"
    assert sentiment["task"] == "sequence-classification" and sentiment["route"] == "/v1/classify"
    for adapter in (chat, sentiment):
        assert adapter["loaded_before"] is False and adapter["errors"] == 0 and adapter["warm_requests"] == 3
        assert adapter["cold_ms"] >= 1000 * COLD_S - 2 and adapter["warm_p50_ms"] < 1000 * COLD_S
        assert adapter["cold_over_warm_ms"] == pytest.approx(adapter["cold_ms"] - adapter["warm_p50_ms"])
    assert server.seen["chat-lora"] == 4 and server.seen["sentiment-lora"] == 4  # every one carried the header


def test_bench_serve_on_a_generation_server_prints_the_table_and_writes_json(server, tmp_path):
    from typer.testing import CliRunner

    from raytune_ft.cli import app

    texts = tmp_path / "texts.txt"
    texts.write_text("ok\nok\n")
    out = tmp_path / "bench.json"
    args = ["--concurrency", "1,2", "--requests", "4", "--warmup", "1", "--max-tokens", "5"]
    args += ["--texts", str(texts), "--adapters", "chat-lora", "--adapter-requests", "2", "--json", str(out)]
    result = CliRunner().invoke(app, ["bench", "serve", server.url, *args])
    assert result.exit_code == 0, result.output
    assert "TTFT p50" in result.output and "batching gain" in result.output and "chat-lora" in result.output
    written = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in written["levels"]] == [1, 2] and written["errors"] == 0
    assert [a["id"] for a in written["adapters"]] == ["chat-lora"] and written["max_tokens"] == 5


# --- the in-process floor


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory) -> Path:
    import torch
    from tiny_models import chat_tokenizer, llama_config
    from transformers import LlamaForCausalLM

    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(len(tokenizer), max_position_embeddings=256))
    export = tmp_path_factory.mktemp("gen") / "export"
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    (export / "raytune_ft.json").write_text(json.dumps({"task": "chat", "experiment": {"name": "t"}}))
    return export


def test_the_floor_runs_the_engine_on_the_export_at_one_and_many(chat_export):
    from raytune_ft.bench.generation import generation_floor

    floor = generation_floor(chat_export, ["hi", "a longer prompt"], "chat", max_tokens=6, top=4, requests=8, threads=1)
    assert floor["ttft_p50_ms"] > 0 and floor["p50_ms"] >= floor["ttft_p50_ms"]
    assert floor["output_tokens_per_s_c1"] > 0 and floor["output_tokens_per_s_top"] > 0
    assert floor["top_concurrency"] == 4 and [lv["requests"] for lv in floor["levels"]] == [8, 8]
    assert 0 < floor["mean_output_tokens"] <= 6
    assert floor["max_batch_size"] == 16  # the export names none: the engine's default
