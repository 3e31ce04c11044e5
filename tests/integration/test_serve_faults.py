"""Serving under faults and steady load, on a real local Ray: a replica SIGKILLed under a fixed request rate is
replaced with at most 1 % errors and latency back where it was; a soak has no errors and no memory growth."""

from __future__ import annotations

import pytest
from helpers import request, with_serve

from raytune_ft.bench.serve import SENTENCES, classify_bodies
from raytune_ft.bench.soak import serve_processes, soak
from raytune_ft.serve.deploy import deploy

pytestmark = pytest.mark.integration


def test_a_killed_replica_is_replaced_under_load_with_at_most_one_percent_errors(classifier):
    export, cfg = classifier
    two = {"min_replicas": 2, "max_replicas": 2}
    cfg = with_serve(cfg, num_cpus=0.5, autoscaling__min_replicas=2, autoscaling__max_replicas=2)
    assert cfg.serve.autoscaling.model_dump(include=set(two)) == two
    url = deploy(export, cfg)
    before = serve_processes(cfg.serve.port)["replica"]
    assert len(before) == 2

    result = soak(url, classify_bodies(SENTENCES), rate=20, duration_s=30, window_s=3, kill_replica_at_s=6)

    kill = result["kill"]
    assert kill["pid"] in {p.pid for p in before} and kill["replicas_before"] == 2
    assert result["requests"] == 600 and result["error_rate"] <= 0.01, result["error_kinds"]
    # Serve started a new replica process, and it answered requests before the end
    assert kill["new_replica_answered_after_s"] is not None
    assert len(kill["replica_pids_after"]) == 2 and kill["pid"] not in kill["replica_pids_after"]
    last = result["windows"][-1]
    assert last["errors"] == 0 and last["replicas_answering"] == 2
    assert request(f"{url}/healthz")[0] == 200


def test_a_soak_at_a_fixed_rate_has_no_errors_and_no_memory_growth(classifier):
    export, cfg = classifier
    url = deploy(export, cfg)  # one replica again

    result = soak(url, classify_bodies(SENTENCES), rate=25, duration_s=24, window_s=4)

    assert result["requests"] == 600 and result["errors"] == 0, result["error_kinds"]
    assert len(result["windows"]) == 6 and all(w["requests"] == 100 and w["errors"] == 0 for w in result["windows"])
    # the replica's memory after warm-up: sampled in every window, flat within a bound
    assert len(result["memory"]) == 6 and all(m["replica_rss_mb"] for m in result["memory"])
    assert result["replica_rss_max_mb"] - result["replica_rss_first_mb"] < 50
    assert abs(result["replica_rss_slope_mb_per_min"]) < 30
