"""`bench soak`: a served model under a fixed request rate for a bounded time, seen in windows.

Requests start on a fixed schedule (RATE per second, no matter how the server keeps up) and latency counts from
the scheduled start, so a server that falls behind shows it. Each window reports requests, errors, p50/p99 and
the replicas that answered, and (when the server runs on this machine) the resident memory of its Serve
replica and proxy processes. `kill_replica_at_s` SIGKILLs one replica of the app part-way, which shows what a
crash costs: the errors it causes, how long until Serve has replaced it, and whether latency comes back.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import statistics
import time
from typing import Any
from urllib.parse import urlsplit

from raytune_ft.bench.serve import Client, percentile
from raytune_ft.serve.api import REPLICA_HEADER
from raytune_ft.serve.app import APP_NAME

REPLICA_TITLE = f"ServeReplica:{APP_NAME}:"  # Ray's process title of this app's replicas


def serve_processes(port: int) -> dict[str, list[Any]]:
    """The Serve processes behind the local server on PORT: {"replica": [...], "proxy": [...]} (psutil.Process).

    The proxy listening on PORT leads to its raylet, and the app's replicas are that raylet's workers: another
    Ray instance on the machine (another server, a test suite) is never measured or killed."""
    import psutil

    found: dict[str, list[Any]] = {"replica": [], "proxy": []}
    try:
        listener = next(
            c.pid
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
        )
        workers = psutil.Process(listener).parent().children(recursive=True)
    except (StopIteration, psutil.Error):
        return found
    for process in workers:
        try:
            title = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and REPLICA_TITLE in title:
            found["replica"].append(process)
        elif title.startswith("ray::ProxyActor"):
            found["proxy"].append(process)
    return found


def rss_mb(processes: list[Any]) -> float | None:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except Exception:  # a replica that just died
            continue
    return total / 2**20 if processes else None


async def _soak(
    client: Client,
    bodies: list[bytes],
    rate: float,
    duration_s: float,
    window_s: float,
    kill_replica_at_s: float | None,
    log: Any,
) -> dict[str, Any]:
    queue = itertools.cycle(bodies)
    records: list[tuple[float, float | None, str, str, float]] = []  # (due, latency or None, error, replica, ended)
    memory: list[dict[str, Any]] = []
    killed: dict[str, Any] = {}
    start = time.perf_counter() + 0.05
    count = int(rate * duration_s)
    port = urlsplit(client.url).port or 80

    async def one(due: float) -> None:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        try:
            async with client.session.post(client.url, data=next(queue)) as response:
                await response.read()
                replica = response.headers.get(REPLICA_HEADER, "")
                ok = response.status == 200
                latency = time.perf_counter() - due if ok else None
                ended = time.perf_counter() - start
                records.append((due - start, latency, "" if ok else str(response.status), replica, ended))
        except Exception as exc:  # a dropped connection is an error of the soak, not of the tool
            records.append((due - start, None, type(exc).__name__, "", time.perf_counter() - start))

    async def watch() -> None:
        """Memory every window; the replica kill when its time comes."""
        next_sample = 0.0
        while (now := time.perf_counter() - start) < duration_s:
            if kill_replica_at_s is not None and not killed and now >= kill_replica_at_s:
                replicas = (await asyncio.to_thread(serve_processes, port))["replica"]
                if not replicas:
                    killed["error"] = f"no replica process of the app behind port {port} on this machine"
                else:
                    victim = min(replicas, key=lambda p: p.pid)
                    os.kill(victim.pid, signal.SIGKILL)
                    killed.update(pid=victim.pid, at_s=now, replicas_before=len(replicas))
                    log(f"killed replica pid {victim.pid} at {now:.1f} s")
            if now >= next_sample:
                found = await asyncio.to_thread(serve_processes, port)  # off the loop: requests keep their schedule
                memory.append(
                    {
                        "t_s": now,
                        "replica_rss_mb": rss_mb(found["replica"]),
                        "proxy_rss_mb": rss_mb(found["proxy"]),
                        "replica_pids": sorted(p.pid for p in found["replica"]),
                    }
                )
                next_sample += window_s
            await asyncio.sleep(0.1)

    tasks = [asyncio.ensure_future(one(start + i / rate)) for i in range(count)]
    await asyncio.gather(watch(), *tasks)
    return summarize(records, memory, killed, rate, duration_s, window_s)


def summarize(
    records: list[tuple[float, float | None, str, str, float]],
    memory: list[dict[str, Any]],
    killed: dict[str, Any],
    rate: float,
    duration_s: float,
    window_s: float,
) -> dict[str, Any]:
    windows = []
    for index in range(max(1, int(round(duration_s / window_s)))):
        low, high = index * window_s, (index + 1) * window_s
        inside = [r for r in records if low <= r[0] < high]
        ms = [1000 * r[1] for r in inside if r[1] is not None]
        sample = next((m for m in memory if low <= m["t_s"] < high), {})
        windows.append(
            {
                "from_s": low,
                "requests": len(inside),
                "errors": sum(1 for r in inside if r[1] is None),
                "p50_ms": percentile(ms, 50) if ms else None,
                "p99_ms": percentile(ms, 99) if ms else None,
                "max_ms": max(ms) if ms else None,
                "replicas_answering": len({r[3] for r in inside if r[3]}),
                "replica_rss_mb": sample.get("replica_rss_mb"),
                "proxy_rss_mb": sample.get("proxy_rss_mb"),
            }
        )
    errors = [r[2] for r in records if r[1] is None]
    ok_ms = [1000 * r[1] for r in records if r[1] is not None]
    result: dict[str, Any] = {
        "rate": rate,
        "duration_s": duration_s,
        "window_s": window_s,
        "requests": len(records),
        "errors": len(errors),
        "error_rate": len(errors) / len(records) if records else 0.0,
        "error_kinds": {kind: errors.count(kind) for kind in sorted(set(errors))},
        "p50_ms": percentile(ok_ms, 50) if ok_ms else None,
        "p99_ms": percentile(ok_ms, 99) if ok_ms else None,
        "windows": windows,
        "memory": memory,
    }
    rss = [(m["t_s"], m["replica_rss_mb"]) for m in memory if m["replica_rss_mb"] is not None]
    if len(rss) >= 2 and not killed:
        # growth after the first window (warm-up: caches, allocator pools), least squares in MB per minute
        steady = rss[1:] if len(rss) > 2 else rss
        result["replica_rss_first_mb"], result["replica_rss_last_mb"] = steady[0][1], steady[-1][1]
        result["replica_rss_max_mb"] = max(v for _, v in steady)
        result["replica_rss_slope_mb_per_min"] = 60 * _slope(steady)
    if killed:
        result["kill"] = {**killed, **recovery(records, memory, killed, window_s)}
    return result


def recovery(
    records: list[tuple[float, float | None, str, str, float]], memory: list[dict], killed: dict, window_s: float
) -> dict[str, Any]:
    """What the kill cost: errors after it, when a new replica answered, latency before vs after recovery."""
    if "at_s" not in killed:
        return {}
    at = killed["at_s"]
    before_ids = {r[3] for r in records if r[0] < at and r[3]}
    new = [r[0] for r in records if r[0] >= at and r[3] and r[3] not in before_ids]
    replaced_at = min(new) if new else None
    before = [1000 * r[1] for r in records if r[0] < at and r[1] is not None and r[0] >= window_s]
    after_from = replaced_at if replaced_at is not None else at
    after = [1000 * r[1] for r in records if r[0] >= after_from + window_s and r[1] is not None]
    return {
        # requests that ended after the kill, those in flight on the killed replica included
        "errors_after_kill": sum(1 for r in records if r[4] >= at and r[1] is None),
        "new_replica_answered_after_s": None if replaced_at is None else replaced_at - at,
        "replica_pids_after": memory[-1]["replica_pids"] if memory else [],
        "p50_ms_before": percentile(before, 50) if before else None,
        "p99_ms_before": percentile(before, 99) if before else None,
        "p50_ms_after_recovery": percentile(after, 50) if after else None,
        "p99_ms_after_recovery": percentile(after, 99) if after else None,
    }


def _slope(points: list[tuple[float, float]]) -> float:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in points) / spread if spread else 0.0


def soak(
    url: str,
    bodies: list[bytes],
    rate: float,
    duration_s: float,
    window_s: float = 10.0,
    kill_replica_at_s: float | None = None,
    api_key: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Soak URL's /v1/classify at RATE requests/s for DURATION_S seconds; the figures (see the module text)."""

    async def main() -> dict[str, Any]:
        # enough connections for the requests in flight at this rate even at a 10x slowdown
        async with Client(f"{url.rstrip('/')}/v1/classify", api_key, max(8, int(rate))) as client:
            return await _soak(client, bodies, rate, duration_s, window_s, kill_replica_at_s, log)

    return asyncio.run(main())
