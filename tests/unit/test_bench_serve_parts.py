"""`bench serve`'s arithmetic: percentiles, Server-Timing parsing, per-level stats and the c=1 breakdown."""

from __future__ import annotations

import pytest

from raytune_ft.bench.serve import breakdown, level_stats, percentile, server_timing, summarize


def test_nearest_rank_percentile():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 90) == 3.0


def test_server_timing_reads_every_header_and_skips_what_it_cannot_read():
    parsed = server_timing(["model;dur=9.5, wait;dur=0.25", "app;dur=12.00", "cache;desc=hit, bad;dur=x"])
    assert parsed == {"model": 9.5, "wait": 0.25, "app": 12.0}
    assert server_timing([]) == {}


def test_level_stats_reports_the_replicas_timings_beside_the_clients():
    stats = level_stats(
        [0.010, 0.020, 0.030], wall_s=1.5, errors=1, batch_sizes=[1, 3], timings=[{"app": 5.0}, {"app": 7.0}]
    )
    assert stats["requests"] == 4 and stats["rps"] == pytest.approx(2.0)
    assert stats["p50_ms"] == pytest.approx(20.0) and stats["max_ms"] == pytest.approx(30.0)
    assert stats["server_batch_mean"] == 2 and stats["server_batch_max"] == 3
    assert stats["server_app_p50_ms"] == 5.0 and "server_model_p50_ms" not in stats


def test_summary_splits_concurrency_one_latency_into_its_parts():
    one = {"concurrency": 1, "rps": 25.0, "p50_ms": 40.0, "errors": 0}
    one.update(server_app_p50_ms=30.0, server_model_p50_ms=20.0, server_wait_p50_ms=1.0)
    top = {"concurrency": 32, "rps": 80.0, "p50_ms": 400.0, "errors": 0}
    floor = {"p50_ms": 18.0, "batched_rps": 190.0}
    result = summarize([one, top], floor, {"p50_ms": 7.0})
    assert result["overhead_ms"] == pytest.approx(22.0)
    assert result["batching_gain"] == pytest.approx(3.2)
    assert result["app_over_noop_ms"] == pytest.approx(33.0)
    assert result["app_overhead_ms"] == pytest.approx(15.0)
    assert result["breakdown_c1_ms"] == breakdown(one)
    assert result["breakdown_c1_ms"] == pytest.approx(
        {"client_p50": 40.0, "outside_app": 10.0, "app": 30.0, "model": 20.0, "wait": 1.0, "app_own": 9.0}
    )


def test_soak_windows_memory_and_what_a_replica_kill_cost():
    from raytune_ft.bench.soak import summarize

    # 10 req/s for 6 s; replica "a" killed at 3.0 s: the request in flight on it (due 2.9 s) fails when it ends,
    # then "b" answers alone until a new replica "c" shares the load from 4.6 s
    records = []
    for i in range(60):
        due = i / 10
        if abs(due - 2.9) < 1e-9:
            records.append((due, None, "500", "", 3.05))
            continue
        replica = ("a" if i % 2 else "b") if due < 3 else ("b" if due < 4.5 or i % 2 else "c")
        latency = 0.040 if due < 3 or due >= 5 else 0.200
        records.append((due, latency, "", replica, due + latency))
    memory = [{"t_s": t, "replica_rss_mb": 600.0 + t, "proxy_rss_mb": 200.0, "replica_pids": [1, 2]} for t in range(6)]
    killed = {"pid": 1, "at_s": 3.0, "replicas_before": 2}
    result = summarize(records, memory, killed, rate=10, duration_s=6, window_s=1)

    assert result["requests"] == 60 and result["errors"] == 1 and result["error_kinds"] == {"500": 1}
    assert [w["requests"] for w in result["windows"]] == [10] * 6
    assert result["windows"][2]["errors"] == 1 and result["windows"][0]["replicas_answering"] == 2
    assert result["windows"][3]["replicas_answering"] == 1 and result["windows"][3]["replica_rss_mb"] == 603.0
    kill = result["kill"]
    assert kill["errors_after_kill"] == 1  # it was due before the kill but ended after it: the kill's error
    assert kill["new_replica_answered_after_s"] == pytest.approx(1.6)  # "c" first answers at 4.6 s
    assert kill["p50_ms_before"] == pytest.approx(40.0) and kill["p99_ms_after_recovery"] == pytest.approx(40.0)
    assert "replica_rss_slope_mb_per_min" not in result  # a kill changes the replicas: no growth figure

    calm = summarize([r for r in records if r[1] is not None], memory, {}, rate=10, duration_s=6, window_s=1)
    assert calm["errors"] == 0 and calm["replica_rss_first_mb"] == 601.0 and calm["replica_rss_last_mb"] == 605.0
    assert calm["replica_rss_slope_mb_per_min"] == pytest.approx(60.0)  # +1 MB per second
