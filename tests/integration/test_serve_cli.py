"""`serve --detach`, `bench serve`, `bench soak` and `serve stop` as a user runs them: separate processes, an
embedded Ray in the background server, real HTTP load."""

from __future__ import annotations

import json
import os
import re
import urllib.request

import pytest
from helpers import cli, free_port

pytestmark = pytest.mark.integration


def test_detached_server_is_benchmarked_then_stopped(classifier_run, tmp_path):
    env = {**os.environ, "RAYTUNE_FT_STATE_DIR": str(tmp_path / "state")}
    run_dir = classifier_run[0].run_dir  # `serve` finds the export inside a run directory
    port = free_port()

    started = cli(
        "serve",
        str(run_dir),
        f"serve.port={port}",
        "serve.batch_wait_timeout_s=0.005",
        "--detach",
        env=env,
        sigint_ignored=True,
    )
    assert started.returncode == 0, started.stderr[-3000:]
    server_pid = int(re.search(r"server pid (\d+)", started.stderr).group(1))
    url = started.stdout.strip().splitlines()[-1]
    assert url == f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
        assert response.status == 200
    try:
        out = tmp_path / "bench.json"
        plot = tmp_path / "bench.png"
        bench = cli(
            "bench",
            "serve",
            url,
            "--concurrency",
            "1,8",
            "--rates",
            "50",
            "--requests",
            "60",
            "--warmup",
            "5",
            "--baseline-noop",
            "--json",
            str(out),
            "--plot",
            str(plot),
            env=env,
        )
        assert bench.returncode == 0, bench.stderr[-3000:]
        result = json.loads(out.read_text())
        levels = result["levels"]
        assert [lv.get("concurrency") for lv in levels[:2]] == [1, 8] and levels[2]["rate"] == 50
        for level in levels:
            assert level["errors"] == 0 and level["requests"] == 60 and level["rps"] > 0
            assert 0 < level["p50_ms"] <= level["p90_ms"] <= level["p99_ms"] <= level["max_ms"]
        assert levels[1]["server_batch_max"] > 1  # 8 clients at once share batches
        assert result["floor"]["p50_ms"] > 0 and result["floor"]["batched_rps"] > 0
        assert result["overhead_ms"] == pytest.approx(levels[0]["p50_ms"] - result["floor"]["p50_ms"])
        assert result["batching_gain"] == pytest.approx(levels[1]["rps"] / levels[0]["rps"])
        assert result["noop_p50_ms"] > 0 and plot.stat().st_size > 10_000
        assert "batching gain" in bench.stdout and "no-op Ray Serve app" in bench.stdout

        # `bench soak` from the command line: a fixed rate for a bounded time, in windows, with the replica's memory
        soaked = tmp_path / "soak.json"
        args = ["--rate", "10", "--duration", "6", "--window", "3", "--json", str(soaked)]
        soak = cli("bench", "soak", url, *args, env=env)
        assert soak.returncode == 0, soak.stderr[-3000:]
        figures = json.loads(soaked.read_text())
        assert figures["requests"] == 60 and figures["errors"] == 0, figures["error_kinds"]
        assert [w["requests"] for w in figures["windows"]] == [30, 30]
        assert all(m["replica_rss_mb"] for m in figures["memory"])
        assert "soak at 10 req/s for 6 s" in soak.stdout
    finally:
        stopped = cli("serve", "stop", env=env)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped the server" in stopped.stderr
    # gone when `serve stop` returns (it had SIGINT ignored: stop used to give up after 60 s, signal SIGTERM and
    # return while the server still held the port, and a server started next joined the dying one)
    with pytest.raises(ProcessLookupError):
        os.kill(server_pid, 0)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/healthz", timeout=5)
    assert not list((tmp_path / "state").glob("serve-*.json"))


def test_serve_refuses_what_it_cannot_serve(tmp_path):
    env = {**os.environ, "RAYTUNE_FT_STATE_DIR": str(tmp_path / "state")}
    done = cli("serve", str(tmp_path), env=env, timeout=120)
    assert done.returncode == 2 and "no raytune_ft.json" in done.stderr
    done = cli("serve", "stop", env=env, timeout=120)
    assert done.returncode == 0 and "no raytune-ft server was running" in done.stderr
    for args, message in (
        (["--concurrency", "0"], "--concurrency levels must be >= 1"),
        (["--concurrency", "a"], "--concurrency takes integers"),
        (["--api-key-env", "RAYTUNE_FT_UNSET_VAR"], "RAYTUNE_FT_UNSET_VAR is not set"),
    ):
        done = cli("bench", "serve", "http://127.0.0.1:9", *args, env=env, timeout=120)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    done = cli("bench", "serve", "http://127.0.0.1:9", env=env, timeout=120)
    assert done.returncode == 1 and "is `raytune-ft serve` running there?" in done.stderr
