"""`bench serve` of a generation server (a causal-LM or chat export): streamed completions under closed-loop load,
the same generation in this process (the floor), and LoRA adapters' first (cold) and later (warm) requests.

Each request streams (`"stream": true`, usage included) and is timed from sending it: time to first token (the
first event carrying text), the gaps between consecutive text events (inter-token latency, pooled over the
level's requests), and end to end (to `data: [DONE]`). Output tokens are the usage's `completion_tokens` (the
count of text events where a server sends no usage). A request fails by kind: its HTTP status (non-200), an error
event in the stream (`error_event:TYPE`), a stream that ends without [DONE] or breaks (`broken_stream`), a stall
past STALL_S (`timeout`), an event that is not JSON (`bad_event`), or the exception's name when no answer came.
Each level also carries a classifier level's keys (rps, p50_ms ... p99_ms over end-to-end latency), so that what
reads a classifier's levels (serve.plot, `run`'s latency check and summary, the report) can read these. `raytune-ft
bench serve` calls this module when /v1/models says the server generates (the dispatch is in cli/bench.py: this
module imports bench/serve.py's helpers, so bench/serve.py cannot import it back without an import circle).

The floor is the export's GenerationEngine (serve/engine.py) in this process with the same prompts, max_tokens and
greedy decoding: its time to first token (submit to first token id) at concurrency 1, and output tokens/s at
concurrency 1 and at the largest level: what the hardware gives without HTTP, Ray Serve or the detokenizer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytune_ft.bench.serve import Client, _kinds, _split, level_stats, percentile

MULTIPLEX_HEADER = "serve_multiplexed_model_id"  # Ray Serve model multiplexing: the adapter a request is for
STALL_S = 120.0  # a stream silent this long is a failed request (`timeout`); a long answer is not
ADAPTER_MAX_TOKENS = 8  # an adapter request is a short non-streamed generation: the load shows, not the decoding


class SSEParser:
    """Server-sent events, fed bytes as they arrive: each complete event's data (its `data:` lines joined with
    newlines). Lines end with LF or CRLF; comments (`:` lines) and the other fields (event, id, retry) are skipped."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        events = []
        for raw in lines:
            line = raw.removesuffix(b"\r").decode("utf-8", errors="replace")
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            name, colon, value = line.partition(":")
            if name == "data":
                self._data.append(value.removeprefix(" ") if colon else "")
        return events

    def close(self) -> list[str]:
        """What a stream that ended without a last blank line left: its last event, if whole lines hold one."""
        return self.feed(b"\n\n") if self._buffer.strip() or self._data else []


@dataclass
class Streamed:
    """One streamed request, times in seconds from sending it."""

    ok: bool = False
    error: str = ""
    ttft_s: float | None = None  # first event with text
    gaps_s: list[float] = field(default_factory=list)  # between consecutive events with text
    e2e_s: float | None = None
    chunks: int = 0  # events with text
    completion_tokens: int | None = None  # the usage's
    finish_reason: str | None = None
    done: bool = False  # data: [DONE] came
    _last: float | None = None

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.chunks

    def event(self, data: str, at_s: float) -> bool:
        """Take one event's DATA, received AT_S after sending; True when the stream is over ([DONE] or an error)."""
        if data.strip() == "[DONE]":
            self.done = True
            return True
        try:
            payload = json.loads(data)
        except ValueError:
            self.error = "bad_event"
            return True
        if not isinstance(payload, dict):
            self.error = "bad_event"
            return True
        if "error" in payload:
            detail = payload["error"] if isinstance(payload["error"], dict) else {}
            self.error = f"error_event:{detail.get('type') or detail.get('code') or 'unknown'}"
            return True
        for choice in payload.get("choices") or []:
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str) and text:
                if self._last is None:
                    self.ttft_s = at_s
                else:
                    self.gaps_s.append(at_s - self._last)
                self._last = at_s
                self.chunks += 1
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        usage = payload.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.completion_tokens = usage["completion_tokens"]
        return False

    def end(self, at_s: float) -> Streamed:
        self.e2e_s = at_s
        if not self.error and not self.done:
            self.error = "broken_stream"
        self.ok = not self.error
        return self


class GenerationClient(Client):
    """The load generator's HTTP session (serve.Client's: kept-alive connections, the API key) with streamed and
    plain JSON requests to any route of the server at URL."""

    def __init__(self, url: str, api_key: str | None, connections: int) -> None:
        super().__init__(url.rstrip("/"), api_key, connections)

    async def stream(self, route: str, body: bytes, headers: dict[str, str] | None = None) -> Streamed:
        import aiohttp

        result = Streamed()
        started = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=STALL_S)
        answered = False
        try:
            async with self.session.post(self.url + route, data=body, headers=headers, timeout=timeout) as response:
                answered = True
                if response.status != 200:
                    await response.read()
                    result.error = str(response.status)
                    return result.end(time.perf_counter() - started)
                parser = SSEParser()
                async for chunk in response.content.iter_any():
                    at = time.perf_counter() - started
                    if any(result.event(data, at) for data in parser.feed(chunk)):
                        return result.end(at)
                at = time.perf_counter() - started
                any(result.event(data, at) for data in parser.close())
                return result.end(at)
        except TimeoutError:
            result.error = "timeout"
        except Exception as exc:  # a refused or dropped connection is an error of the level, not of the benchmark
            result.error = "broken_stream" if answered else type(exc).__name__
        return result.end(time.perf_counter() - started)

    async def post(self, route: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[float, str]:
        """(seconds, error kind or '') of one non-streamed request."""
        started = time.perf_counter()
        try:
            async with self.session.post(self.url + route, data=body, headers=headers) as response:
                await response.read()
                return time.perf_counter() - started, "" if response.status == 200 else str(response.status)
        except TimeoutError:
            return time.perf_counter() - started, "timeout"
        except Exception as exc:
            return time.perf_counter() - started, type(exc).__name__

    async def models(self) -> list[dict[str, Any]]:
        """GET /v1/models's data ([] when it cannot be read: the adapters' `loaded` is then unknown)."""
        try:
            async with self.session.get(self.url + "/v1/models") as response:
                if response.status != 200:
                    return []
                data = (await response.json()).get("data")
                return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        except Exception:
            return []


def route_of(task: str | None) -> str:
    return "/v1/chat/completions" if task == "chat" else "/v1/completions"


def request_body(
    task: str | None, model: str | None, text: str, max_tokens: int, stream: bool = True, ignore_eos: bool = False
) -> bytes:
    """A greedy generation request for TEXT: a user message to a chat export, a prompt to a causal LM. IGNORE_EOS:
    every answer MAX_TOKENS long (vLLM's extension, which the server takes too), so levels compare equal work."""
    body: dict[str, Any] = {"model": model} if model else {}
    if task == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    body.update(max_tokens=max_tokens, temperature=0)
    if ignore_eos:
        body["ignore_eos"] = True
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return json.dumps(body).encode()


def generation_stats(records: list[Streamed], wall_s: float) -> dict[str, Any]:
    """One level's figures: a classifier level's (requests, rps, p50_ms ... over end-to-end latency, errors) and
    the generation ones, over the requests that succeeded; errors by kind."""
    done = [r for r in records if r.ok]
    errors = [r.error for r in records if not r.ok]
    stats = level_stats([r.e2e_s for r in done], wall_s, len(errors), [])
    ttft = [1000 * r.ttft_s for r in done if r.ttft_s is not None]
    itl = [1000 * gap for r in done for gap in r.gaps_s]
    e2e = [1000 * r.e2e_s for r in done]
    # time per output token after the first: the decoding rate one request saw (as vLLM's benchmark reports it)
    tpot = [1000 * (r.e2e_s - r.ttft_s) / (r.tokens - 1) for r in done if r.ttft_s is not None and r.tokens > 1]
    tokens = sum(r.tokens for r in done)

    def p(values: list[float], q: float) -> float | None:
        return percentile(values, q) if values else None

    return {
        **stats,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "mean_output_tokens": tokens / len(done) if done else None,
        "ttft_p50_ms": p(ttft, 50),
        "ttft_p99_ms": p(ttft, 99),
        "itl_p50_ms": p(itl, 50),
        "itl_p99_ms": p(itl, 99),
        "e2e_p50_ms": p(e2e, 50),
        "e2e_p99_ms": p(e2e, 99),
        "tpot_p50_ms": p(tpot, 50),
        "wall_s": wall_s,
        "error_kinds": _kinds(errors),
        "finish_reasons": _kinds([r.finish_reason or "none" for r in done]),
        "without_usage": sum(r.completion_tokens is None for r in done),
    }


async def closed_level(
    client: GenerationClient,
    route: str,
    bodies: list[bytes],
    concurrency: int,
    requests: int,
    warmup: int,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """CONCURRENCY clients, each streaming its next request when the previous one ends; WARMUP requests first,
    not counted."""
    queue = itertools.cycle(bodies)
    records: list[Streamed] = []

    async def worker(count: int, record: bool) -> None:
        for _ in range(count):
            result = await client.stream(route, next(queue), headers)
            if record:
                records.append(result)

    await asyncio.gather(*(worker(c, False) for c in _split(warmup, concurrency)))
    started = time.perf_counter()
    await asyncio.gather(*(worker(c, True) for c in _split(requests, concurrency)))
    return {"concurrency": concurrency, **generation_stats(records, time.perf_counter() - started)}


def adapters_to_bench(models: list[dict[str, Any]], named: list[str] | None) -> list[str]:
    """NAMED, else every entry of /v1/models marked an adapter, else every entry when there are several."""
    if named:
        return list(dict.fromkeys(named))
    flagged = [m["id"] for m in models if m.get("adapter") and m.get("id")]
    if flagged:
        return flagged
    return [m["id"] for m in models if m.get("id")] if len(models) > 1 else []


async def bench_adapter(
    client: GenerationClient, adapter: str, default_task: str | None, texts: list[str], repeats: int, max_tokens: int
) -> dict[str, Any]:
    """The first request to ADAPTER (cold: the replica loads it unless /v1/models said it was loaded) and REPEATS
    more (warm), each with the multiplexing header: POST /v1/classify for a classifier, a short non-streamed
    generation otherwise."""
    entry = next((m for m in await client.models() if m.get("id") == adapter), None)
    task = (entry or {}).get("task") or default_task
    headers = {MULTIPLEX_HEADER: adapter}
    tokens = min(ADAPTER_MAX_TOKENS, max_tokens)
    if task == "sequence-classification":
        route = "/v1/classify"
        bodies = [json.dumps({"text": t}).encode() for t in texts]
    else:
        route = route_of(task)
        bodies = [request_body(task, adapter, t, tokens, stream=False) for t in texts]
    queue = itertools.cycle(bodies)
    cold_s, cold_error = await client.post(route, next(queue), headers)
    warm, errors = [], [cold_error] if cold_error else []
    for _ in range(repeats):
        seconds, error = await client.post(route, next(queue), headers)
        if error:
            errors.append(error)
        else:
            warm.append(1000 * seconds)
    warm_p50 = statistics.median(warm) if warm else None
    return {
        "id": adapter,
        "task": task,
        "listed": entry is not None,
        "loaded_before": entry.get("loaded") if entry else None,
        "route": route,
        "cold_ms": None if cold_error else 1000 * cold_s,
        "cold_error": cold_error or None,
        "warm_p50_ms": warm_p50,
        "warm_requests": repeats,
        "cold_over_warm_ms": 1000 * cold_s - warm_p50 if warm_p50 is not None and not cold_error else None,
        "errors": len(errors),
        "error_kinds": _kinds(errors),
    }


def prompt_of(loaded: Any, task: str | None, text: str) -> list[int]:
    """TEXT as the server tokenises it: a user message through the chat template, or a plain prompt."""
    if task == "chat":
        return loaded.prompt_ids([{"role": "user", "content": text}])
    return list(loaded.tokenizer(text)["input_ids"])


async def _engine_level(
    engine: Any, prompts: list[list[int]], sampling: Any, concurrency: int, requests: int, warmup: int
) -> dict[str, Any]:
    """CONCURRENCY callers of ENGINE, each submitting its next prompt when the previous answer ends: TTFT (submit
    to the first token id), end to end, output tokens/s."""
    from raytune_ft.serve.engine import Finish

    queue = itertools.cycle(prompts)
    ttft: list[float] = []
    e2e: list[float] = []
    tokens: list[int] = []

    async def one(record: bool) -> None:
        started = time.perf_counter()
        first, count = None, 0
        async for item in engine.generate(next(queue), sampling):
            if isinstance(item, Finish):
                count = item.completion_tokens
            elif first is None:
                first = time.perf_counter() - started
        if record:
            e2e.append(time.perf_counter() - started)
            tokens.append(count)
            if first is not None:
                ttft.append(first)

    async def worker(count: int, record: bool) -> None:
        for _ in range(count):
            await one(record)

    await asyncio.gather(*(worker(c, False) for c in _split(warmup, concurrency)))
    started = time.perf_counter()
    await asyncio.gather(*(worker(c, True) for c in _split(requests, concurrency)))
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": requests,
        "ttft_p50_ms": 1000 * statistics.median(ttft) if ttft else None,
        "p50_ms": 1000 * statistics.median(e2e) if e2e else None,
        "output_tokens_per_s": sum(tokens) / wall if wall > 0 else 0.0,
        "mean_output_tokens": statistics.fmean(tokens) if tokens else None,
    }


def floor_requests(concurrency: int, requests: int) -> int:
    """Requests per floor level: every caller busy twice, at least 16, at most the served level's count."""
    return max(1, min(requests, max(16, 2 * concurrency)))


def generation_floor(
    export: Path,
    texts: list[str],
    task: str | None,
    *,
    max_tokens: int,
    top: int,
    requests: int,
    threads: int,
    max_batch_size: int | None = None,
    ignore_eos: bool = False,
) -> dict[str, Any]:
    """The export's GenerationEngine in this process, greedy, MAX_TOKENS per answer: TTFT p50 and output tokens/s
    at concurrency 1, output tokens/s at TOP (a few unmeasured requests first at each)."""
    from raytune_ft.serve.engine import GenerationEngine, Sampling
    from raytune_ft.serve.model import LoadedModel, serving_stop_ids

    loaded = LoadedModel(export, num_threads=threads)
    prompts = [prompt_of(loaded, task, text) for text in texts]
    sampling = Sampling(max_new_tokens=max_tokens, temperature=0.0)
    options = {"max_batch_size": max_batch_size} if max_batch_size else {}

    # the served engine's stop ids: an answer ends where the server's would
    stops = [] if ignore_eos else serving_stop_ids(loaded.tokenizer, loaded.model)
    engine = GenerationEngine(loaded.model, pad_id=loaded.tokenizer.pad_token_id, stop_ids=stops, **options)

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            one = await _engine_level(engine, prompts, sampling, 1, floor_requests(1, requests), 2)
            many = one
            if top > 1:
                many = await _engine_level(engine, prompts, sampling, top, floor_requests(top, requests), top)
            return one, many
        finally:
            engine.close()

    one, many = asyncio.run(main())
    return {
        "export": str(loaded.export_dir),
        "threads": threads,
        "max_batch_size": engine.max_batch_size,  # the server's when known, else the engine's default
        "max_tokens": max_tokens,
        "ttft_p50_ms": one["ttft_p50_ms"],
        "p50_ms": one["p50_ms"],  # end to end at concurrency 1 (what the latency plot draws as the floor)
        "output_tokens_per_s_c1": one["output_tokens_per_s"],
        "top_concurrency": many["concurrency"],
        "output_tokens_per_s_top": many["output_tokens_per_s"],
        "mean_output_tokens": one["mean_output_tokens"],
        "levels": [one] if many is one else [one, many],
    }


def summarize_generation(levels: list[dict[str, Any]], floor_result: dict[str, Any] | None) -> dict[str, Any]:
    """The levels, the floor and what the levels show against each other and against the floor."""
    first = next((lv for lv in levels if lv["concurrency"] == 1), None)
    top = max(levels, key=lambda lv: lv["concurrency"]) if levels else None
    gain = None
    if first and top and first["output_tokens_per_s"]:
        gain = top["output_tokens_per_s"] / first["output_tokens_per_s"]
    ttft_over = overhead = top_share = None
    if first and floor_result:
        if first["ttft_p50_ms"] is not None and floor_result.get("ttft_p50_ms") is not None:
            ttft_over = first["ttft_p50_ms"] - floor_result["ttft_p50_ms"]
        if first["p50_ms"] is not None and floor_result.get("p50_ms") is not None:
            overhead = first["p50_ms"] - floor_result["p50_ms"]
    if top and floor_result and floor_result.get("output_tokens_per_s_top"):
        top_share = top["output_tokens_per_s"] / floor_result["output_tokens_per_s_top"]
    return {
        "benchmark": "generation",
        "levels": levels,
        "floor": floor_result,
        "batching_gain": gain,
        "ttft_over_floor_ms": ttft_over,
        "overhead_ms": overhead,  # end to end at c=1, served less in-process
        "tokens_per_s_of_floor_top": top_share,  # served output tokens/s at the top level / the floor's there
        "errors": sum(lv["errors"] for lv in levels),
    }


def floor_batch_size(info: dict[str, Any], export: Path) -> int | None:
    """The server's continuous-batching limit: /v1/models's when it says, else the export's serve.max_batch_size
    (None: the engine's default)."""
    if info.get("max_batch_size"):
        return int(info["max_batch_size"])
    from raytune_ft.serve.model import find_export

    try:
        meta = json.loads((find_export(export) / "raytune_ft.json").read_text())
        value = ((meta.get("experiment") or {}).get("serve") or {}).get("max_batch_size")
        return int(value) if value else None
    except (OSError, ValueError):
        return None


def bench_generation(
    url: str,
    info: dict[str, Any],
    *,
    concurrency: list[int],
    requests: int,
    warmup: int,
    api_key: str | None,
    texts: list[str],
    model: Path | None,
    max_tokens: int = 64,
    adapters: list[str] | None = None,
    adapter_requests: int = 10,
    ignore_eos: bool = False,
    rates: list[float] = (),
    baseline_noop: bool = False,
    address: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """`bench serve` against a server whose /v1/models entry INFO is a causal LM or chat export: adapters first
    (so that their first request finds them unloaded), then the closed-loop levels, then the floor."""
    from raytune_ft.bench.serve import noop_baseline

    task, model_id = info.get("task"), info.get("id")
    route = route_of(task)
    bodies = [request_body(task, model_id, text, max_tokens, ignore_eos=ignore_eos) for text in texts]
    # an adapter of a multiplexed deployment: the header lets Ray Serve route to a replica that has it loaded
    headers = {MULTIPLEX_HEADER: model_id} if info.get("adapter") and model_id else None
    if rates:
        log("--rates: open loop is measured for classifiers only; a generation server gets the closed-loop levels")
    levels = []
    adapter_results: list[dict[str, Any]] = []

    async def main() -> None:
        async with GenerationClient(url, api_key, max(concurrency + [64])) as client:
            names = adapters_to_bench(await client.models(), adapters)
            for name in names:
                log(f"adapter {name}: 1 cold request, then {adapter_requests} warm")
                adapter_results.append(await bench_adapter(client, name, task, texts, adapter_requests, max_tokens))
            for c in concurrency:
                log(f"closed loop, concurrency {c}: {requests} streamed requests of up to {max_tokens} tokens")
                levels.append(await closed_level(client, route, bodies, c, requests, warmup, headers))

    asyncio.run(main())
    floor_result = None
    export = model or (Path(info["export_dir"]) if info.get("export_dir") else None)
    if export is None or not export.is_dir():
        log("no in-process floor: the export is not on this machine (pass --model EXPORT_DIR)")
    else:
        log(f"in-process floor: {export}")
        try:
            floor_result = generation_floor(
                export,
                texts,
                task,
                max_tokens=max_tokens,
                top=max(concurrency),
                requests=requests,
                threads=info.get("threads") or 1,
                max_batch_size=floor_batch_size(info, export),
                ignore_eos=ignore_eos,
            )
        except (OSError, ValueError, RuntimeError) as exc:  # the served figures stand without it
            log(f"no in-process floor: {type(exc).__name__}: {exc}")
    result = summarize_generation(levels, floor_result)
    if baseline_noop:
        noop = noop_baseline(url, bodies[0], requests, warmup, address, log)
        result["noop_p50_ms"], result["noop"] = noop["p50_ms"], noop
    if adapter_results:
        result["adapters"] = adapter_results
    result.update(
        url=url,
        endpoint=url.rstrip("/") + route,
        model=model_id,
        task=task,
        max_tokens=max_tokens,
        ignore_eos=ignore_eos,
    )
    return result


def bench_served(
    url: str,
    *,
    concurrency: list[int],
    rates: list[float],
    requests: int,
    warmup: int,
    api_key: str | None,
    texts: list[str],
    model: Path | None,
    baseline_noop: bool = False,
    address: str | None = None,
    max_tokens: int = 64,
    adapters: list[str] | None = None,
    adapter_requests: int = 10,
    ignore_eos: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """`bench serve URL`, whatever it serves: a generation benchmark when a model there generates (the first that
    does is measured), else the classifier's (bench/serve.py)."""
    from raytune_ft.bench.serve import BenchServeError, bench_serve, model_info
    from raytune_ft.config.schema import CAUSAL_TASKS

    models = model_info(url, api_key)
    generating = [m for m in models if m.get("task") in CAUSAL_TASKS]
    if not generating:
        return bench_serve(
            url,
            models[0],
            concurrency=concurrency,
            rates=rates,
            requests=requests,
            warmup=warmup,
            api_key=api_key,
            texts=texts,
            model=model,
            baseline_noop=baseline_noop,
            address=address,
            log=log,
        )
    if not concurrency:
        raise BenchServeError("a generation server is measured in closed loop: pass --concurrency levels")
    return bench_generation(
        url,
        generating[0],
        concurrency=concurrency,
        requests=requests,
        warmup=warmup,
        api_key=api_key,
        texts=texts,
        model=model,
        max_tokens=max_tokens,
        adapters=adapters,
        adapter_requests=adapter_requests,
        ignore_eos=ignore_eos,
        rates=rates,
        baseline_noop=baseline_noop,
        address=address,
        log=log,
    )
