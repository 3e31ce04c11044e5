"""`bench serve`: an HTTP load generator for a served model, the in-process floor, and Ray Serve's own floor.

Closed loop: C clients, each sending its next request when the previous one returns. Open loop: requests start
at Poisson arrival times whatever the server does, and latency counts from the scheduled start, so a server
that falls behind shows it (no coordinated omission). Each level starts with warm-up requests that are not
counted. The floor is the same model's forward pass in this process (batch 1 and batched), which puts a number
on what serving adds; `--baseline-noop` deploys the plainest Serve app beside the model and times it, which puts
a number on what Ray Serve itself adds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

from raytune_ft.errors import RaytuneFtError

# Review-like sentences of mixed length: the default request texts (the package reads no data set for this).
SENTENCES = [
    "a gripping, beautifully shot film that stays with you long after the credits roll .",
    "the plot is thin and the jokes land with a thud .",
    "an uneven but often funny comedy .",
    "it 's a charming and often affecting journey .",
    "the performances are wooden , the script worse .",
    "a masterpiece of quiet, patient storytelling that rewards every minute you give it .",
    "too long , too loud and far too pleased with itself .",
    "one of the year 's best .",
    "the director never finds a tone , and the cast seems as lost as the audience .",
    "warm , witty and wise .",
    "a tedious exercise in style over substance .",
    "by the end i cared about every one of these people .",
]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of VALUES."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def level_stats(
    latencies_s: list[float], wall_s: float, errors: int, batch_sizes: list[int], timings: list[dict[str, float]] = ()
) -> dict[str, Any]:
    ms = [1000 * x for x in latencies_s]
    done = len(ms)
    # p50 of each Server-Timing part the replica reported (app, model, wait), beside the client's p50
    server = {
        f"server_{part}_p50_ms": percentile([t[part] for t in timings if part in t], 50)
        for part in sorted({part for t in timings for part in t})
    }
    return {
        "requests": done + errors,
        "rps": done / wall_s if wall_s > 0 else 0.0,
        "p50_ms": percentile(ms, 50) if ms else None,
        "p90_ms": percentile(ms, 90) if ms else None,
        "p95_ms": percentile(ms, 95) if ms else None,
        "p99_ms": percentile(ms, 99) if ms else None,
        "max_ms": max(ms) if ms else None,
        "mean_ms": statistics.fmean(ms) if ms else None,
        "errors": errors,
        "server_batch_mean": statistics.fmean(batch_sizes) if batch_sizes else None,
        "server_batch_max": max(batch_sizes) if batch_sizes else None,
        **server,
    }


def server_timing(values: list[str]) -> dict[str, float]:
    """{name: ms} from Server-Timing header values such as 'model;dur=9.1, wait;dur=0.4'."""
    timings = {}
    for value in values:
        for metric in value.split(","):
            name, *params = (part.strip() for part in metric.split(";"))
            for param in params:
                key, _, number = param.partition("=")
                if key == "dur" and name:
                    try:
                        timings[name] = float(number)
                    except ValueError:
                        pass
    return timings


class Client:
    """One HTTP session (kept-alive connections) sending JSON bodies to one endpoint."""

    def __init__(self, url: str, api_key: str | None, connections: int) -> None:
        self.url, self.api_key, self.connections = url, api_key, connections

    async def __aenter__(self) -> Client:
        import aiohttp

        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        connector = aiohttp.TCPConnector(limit=self.connections, force_close=False)
        timeout = aiohttp.ClientTimeout(total=120)
        self.session = aiohttp.ClientSession(headers=headers, connector=connector, timeout=timeout)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.session.close()

    async def send(self, body: bytes | None) -> tuple[bool, int | None, dict[str, float], str]:
        """(ok, server batch size, Server-Timing, error text) for one request; GET when BODY is None."""
        request = self.session.get(self.url) if body is None else self.session.post(self.url, data=body)
        try:
            async with request as response:
                await response.read()
                batch = response.headers.get("x-batch-size")
                timings = server_timing(response.headers.getall("server-timing", []))
                size = int(batch) if batch and batch.isdigit() else None
                ok = response.status == 200
                return ok, size, timings, "" if ok else str(response.status)
        except Exception as exc:  # a refused or dropped connection is an error of the level, not of the benchmark
            return False, None, {}, type(exc).__name__


async def closed_loop(
    client: Client, bodies: list[bytes | None], concurrency: int, requests: int, warmup: int
) -> dict[str, Any]:
    queue = itertools.cycle(bodies)
    latencies: list[float] = []
    batches: list[int] = []
    timings: list[dict[str, float]] = []
    errors: list[str] = []

    async def worker(count: int, record: bool) -> None:
        for _ in range(count):
            started = time.perf_counter()
            ok, batch, timing, error = await client.send(next(queue))
            if not record:
                continue
            if ok:
                latencies.append(time.perf_counter() - started)
                timings.append(timing)
                if batch:
                    batches.append(batch)
            else:
                errors.append(error)

    await asyncio.gather(*(worker(c, False) for c in _split(warmup, concurrency)))
    started = time.perf_counter()
    await asyncio.gather(*(worker(c, True) for c in _split(requests, concurrency)))
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        **level_stats(latencies, wall, len(errors), batches, timings),
        "error_kinds": _kinds(errors),
    }


async def open_loop(
    client: Client, bodies: list[bytes | None], rate: float, requests: int, warmup: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    queue = itertools.cycle(bodies)
    latencies: list[float] = []
    batches: list[int] = []
    timings: list[dict[str, float]] = []
    errors: list[str] = []

    async def one(scheduled: float, record: bool) -> None:
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        ok, batch, timing, error = await client.send(next(queue))
        if record:
            if ok:
                latencies.append(time.perf_counter() - scheduled)  # from when it was due: queueing counts
                timings.append(timing)
                if batch:
                    batches.append(batch)
            else:
                errors.append(error)

    start = time.perf_counter() + 0.05
    times, t = [], start
    for _ in range(warmup + requests):
        times.append(t)
        t += rng.expovariate(rate)
    tasks = [asyncio.ensure_future(one(when, i >= warmup)) for i, when in enumerate(times)]
    measured_from = times[warmup] if requests else start
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - measured_from
    return {"rate": rate, **level_stats(latencies, wall, len(errors), batches, timings), "error_kinds": _kinds(errors)}


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _kinds(errors: list[str]) -> dict[str, int]:
    return {kind: errors.count(kind) for kind in sorted(set(errors))}


def classify_bodies(texts: list[str], model: str | None = None) -> list[bytes | None]:
    return [json.dumps({"text": text, **({"model": model} if model else {})}).encode() for text in texts]


def run_levels(
    url: str,
    bodies: list[bytes | None],
    concurrency: list[int],
    rates: list[float],
    requests: int,
    warmup: int,
    api_key: str | None,
    log: Any = print,
) -> list[dict[str, Any]]:
    async def main() -> list[dict[str, Any]]:
        levels = []
        async with Client(url, api_key, max(concurrency + [64])) as client:
            for c in concurrency:
                log(f"closed loop, concurrency {c}: {requests} requests")
                levels.append(await closed_loop(client, bodies, c, requests, warmup))
            for rate in rates:
                log(f"open loop, {rate:g} requests/s (Poisson): {requests} requests")
                levels.append(await open_loop(client, bodies, rate, requests, warmup, seed=len(levels)))
        return levels

    return asyncio.run(main())


def floor(export: Path, texts: list[str], batch_size: int, repeats: int, threads: int) -> dict[str, Any]:
    """The model's forward pass in this process: p50 at batch 1, and items/s at BATCH_SIZE (what batching at most
    buys on this hardware)."""
    from raytune_ft.serve.model import LoadedModel

    model = LoadedModel(export, num_threads=threads)
    single = []
    for text in itertools.islice(itertools.cycle(texts), 3):
        model.classify([text])  # warm-up
    for text in itertools.islice(itertools.cycle(texts), repeats):
        started = time.perf_counter()
        model.classify([text])
        single.append(time.perf_counter() - started)
    batch = list(itertools.islice(itertools.cycle(texts), batch_size))
    model.classify(batch)
    batched = []
    for _ in range(max(3, repeats // 10)):
        started = time.perf_counter()
        model.classify(batch)
        batched.append(time.perf_counter() - started)
    seconds = statistics.median(batched)
    return {
        "p50_ms": 1000 * statistics.median(single),
        "batch_size": batch_size,
        "batched_ms": 1000 * seconds,
        "batched_rps": batch_size / seconds,
        "threads": threads,
    }


def summarize(levels: list[dict[str, Any]], floor_result: dict[str, Any] | None, noop: dict | None) -> dict:
    closed = [lv for lv in levels if "concurrency" in lv]
    first = next((lv for lv in closed if lv["concurrency"] == 1), None)
    top = max(closed, key=lambda lv: lv["concurrency"]) if closed else None
    overhead = None
    if first and floor_result and first["p50_ms"] is not None:
        overhead = first["p50_ms"] - floor_result["p50_ms"]
    gain = top["rps"] / first["rps"] if first and top and first["rps"] else None
    result = {
        "levels": levels,
        "floor": floor_result,
        "overhead_ms": overhead,
        "batching_gain": gain,
        "errors": sum(lv["errors"] for lv in levels),
    }
    if first and first.get("server_app_p50_ms") is not None:
        result["breakdown_c1_ms"] = breakdown(first)
    if noop is not None:
        result["noop_p50_ms"] = noop["p50_ms"]
        result["noop"] = noop
        result["app_over_noop_ms"] = first["p50_ms"] - noop["p50_ms"] if first and first["p50_ms"] else None
        # what the app itself costs: served p50 less Ray Serve's own (no-op app) and less the forward pass
        if result["app_over_noop_ms"] is not None and floor_result:
            result["app_overhead_ms"] = result["app_over_noop_ms"] - floor_result["p50_ms"]
    return result


def breakdown(level: dict[str, Any]) -> dict[str, float]:
    """A level's p50 latency split by the replica's Server-Timing: outside the app (client, HTTP proxy, Serve's
    routing to the replica), and in it: the forward pass, the wait for model and batch, and the rest (ASGI
    middleware, FastAPI routing and validation, JSON, the thread hand-off)."""
    app = level["server_app_p50_ms"]
    model = level.get("server_model_p50_ms", 0.0)
    wait = level.get("server_wait_p50_ms", 0.0)
    return {
        "client_p50": level["p50_ms"],
        "outside_app": level["p50_ms"] - app,
        "app": app,
        "model": model,
        "wait": wait,
        "app_own": app - model - wait,
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("concurrency", "o"), ("rate", "s")):
        levels = [lv for lv in result["levels"] if kind in lv and lv["p50_ms"] is not None]
        if not levels:
            continue
        rps = [lv["rps"] for lv in levels]
        for q, style in (("p50_ms", "-"), ("p99_ms", "--")):
            loop = "closed" if kind == "concurrency" else "open"
            ax.plot(rps, [lv[q] for lv in levels], style, marker=marker, label=f"{q[:3]} ({loop} loop)")
        for lv, x in zip(levels, rps, strict=True):
            ax.annotate(f"{'c' if kind == 'concurrency' else 'r'}={lv[kind]:g}", (x, lv["p50_ms"]), fontsize=7)
    if result.get("noop_p50_ms") is not None:
        ax.axhline(result["noop_p50_ms"], color="grey", linestyle=":", label="no-op Serve app p50")
    if result.get("floor"):
        ax.axhline(result["floor"]["p50_ms"], color="black", linestyle=":", label="in-process forward p50")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("latency vs throughput")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class BenchServeError(RaytuneFtError, RuntimeError):
    pass


def model_info(url: str, api_key: str | None) -> list[dict[str, Any]]:
    """GET URL/v1/models: what the server serves (task, export directory, labels), one entry per model (several
    when one deployment serves several LoRA adapters)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url.rstrip('/')}/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["data"]
    except urllib.error.HTTPError as exc:
        raise BenchServeError(f"GET {request.full_url}: HTTP {exc.code} {exc.read()[:200]!r}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise BenchServeError(f"GET {request.full_url}: {exc}; is `raytune-ft serve` running there?") from None


NOOP_APP, NOOP_ROUTE = "raytune_ft_noop", "/raytune-ft-noop"


def _port_of(url: str) -> int:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def noop_baseline(url: str, body: bytes, requests: int, warmup: int, address: str | None, log: Any) -> dict:
    """Deploy the no-op app on the Ray cluster serving URL (same proxy, route NOOP_ROUTE), time it at concurrency
    1 with the same request body, delete it."""
    local = address is None  # then the local `raytune-ft serve` behind URL says where its Ray is: its own
    if address is None:
        from raytune_ft.serve.deploy import local_servers

        port = _port_of(url)
        server = next((s for s in local_servers() if s["port"] == port), None)
        if server is None:
            raise BenchServeError(f"--baseline-noop: no local raytune-ft server on port {port}; pass --address")
        address = server["ray_address"]
        if server.get("ray_auth_mode"):
            # a new local Ray turns token authentication on, and a driver joining it by address must say so
            # before Ray reads its configuration (at import)
            os.environ.setdefault("RAY_AUTH_MODE", server["ray_auth_mode"])
    import ray
    from ray import serve

    from raytune_ft.serve.app import build_noop_app
    from raytune_ft.train.ray_cluster import ClusterError, join_cluster

    if not ray.is_initialized():
        try:
            join_cluster(address, logging_level="ERROR", log_to_driver=False)  # the replicas' logs stay there
        except ClusterError as exc:
            raise BenchServeError(str(exc)) from None
    from raytune_ft.config.schema import CLUSTER_PLACEMENT_S, EMBEDDED_PLACEMENT_S
    from raytune_ft.serve.deploy import ServeError, wait_until_running

    serve.run_many(  # serve.run would wait for it without end
        [serve.RunTarget(target=build_noop_app(), name=NOOP_APP, route_prefix=NOOP_ROUTE)],
        wait_for_applications_running=False,
    )
    try:
        wait_until_running(NOOP_APP, {"CPU": 1}, EMBEDDED_PLACEMENT_S if local else CLUSTER_PLACEMENT_S, local)
    except ServeError as exc:
        raise BenchServeError(f"--baseline-noop: {exc}") from None
    try:
        base = url.split("://", 1)[0] + "://" + url.split("://", 1)[1].split("/", 1)[0]
        log(f"no-op Ray Serve app at {base}{NOOP_ROUTE}: concurrency 1, {requests} requests")
        [level] = run_levels(f"{base}{NOOP_ROUTE}", [body], [1], [], requests, warmup, None, log=lambda m: None)
        return level
    finally:
        serve.delete(NOOP_APP)


def bench_serve(
    url: str,
    info: dict[str, Any],
    *,
    concurrency: list[int],
    rates: list[float],
    requests: int,
    warmup: int,
    api_key: str | None,
    texts: list[str],
    model: Path | None,
    baseline_noop: bool,
    address: str | None,
    log: Any = print,
) -> dict[str, Any]:
    """`bench serve` against a classifier, whose /v1/models entry is INFO (generation: bench/generation.py)."""
    endpoint = f"{url.rstrip('/')}/v1/classify"
    # an adapter of a multiplexed deployment is named in each request
    bodies = classify_bodies(texts, info.get("id") if info.get("adapter") else None)
    levels = run_levels(endpoint, bodies, concurrency, rates, requests, warmup, api_key, log)
    floor_result = None
    export = model or (Path(info["export_dir"]) if info.get("export_dir") else None)
    if export is not None and export.is_dir() and not info.get("adapter"):
        log(f"in-process floor: {export}")
        floor_result = floor(export, texts, batch_size=max(concurrency), repeats=50, threads=info.get("threads") or 1)
    else:
        log("no in-process floor: the export is not on this machine (pass --model EXPORT_DIR), or is an adapter")
    noop = noop_baseline(url, bodies[0] or b"{}", requests, warmup, address, log) if baseline_noop else None
    result = summarize(levels, floor_result, noop)
    result.update(url=url, endpoint=endpoint, model=info.get("id"), task=info.get("task"))
    return result
