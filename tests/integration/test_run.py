"""`raytune-ft run` end to end, as a user runs it: a tiny BERT on toy reviews it can learn (a tenth ambiguous),
through data, a 2-trial search, the winner tested once, the promotion gate, a detached server, the benchmark and
the report; `bench serve` and `bench soak` against the server it left running; a rerun that skips what is
complete; `serve stop`; and a gate that refuses a winner. The run without a search
(and --stop-server) is tested on a cluster, in test_cluster.py."""

from __future__ import annotations

import csv
import json
import os
import re
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import cli, free_port, write_reviews

from raytune_ft.data import load_split, reads_of_test_split
from raytune_ft.run import STAGES

pytestmark = pytest.mark.integration


def reviews(path: Path, rows: int) -> Path:
    """The toy reviews, where one row in ten (either label) says "good bad": learnable, but not to 1.0."""
    lines = write_reviews(path, rows=rows).read_text().splitlines()
    rows_out = []
    for i, line in enumerate(lines[1:]):
        text, label, source = line.split("\t")
        if i % 20 in (7, 14):
            text = text.replace("good" if label == "1" else "bad", "good bad", 1)
        rows_out.append(f"{text}\t{label}\t{source}")
    path.write_text("\n".join([lines[0], *rows_out]) + "\n")
    return path


def held_out(tmp_path: Path) -> Path:
    """Reviews past the 400 the experiment reads (data.max_rows): rows it never saw, with their source column."""
    lines = reviews(tmp_path / "more_reviews.tsv", rows=460).read_text().splitlines()
    path = tmp_path / "held_out.tsv"
    path.write_text("\n".join([lines[0], *lines[401:461]]) + "\n")
    return path


def edge_cases(tmp_path: Path) -> Path:
    path = tmp_path / "edge.tsv"
    path.write_text(
        "text\texpected\tkind\n"
        "not good at all\tnegative\tnegation\n"
        "oh great , another two hours of this\tnegative\tsarcasm\n"
        "a wonderfull film\tpositive\ttypo\n"
        "BRILLIANT\tpositive\tcase\n"
        "un film magnifique\tpositive\tnon-ascii\n"
    )
    return path


def experiment(tmp_path: Path, tiny_bert: Path, port: int) -> Path:
    raw = {
        "name": "e2e",
        "seed": 3,
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(tiny_bert), "task": "sequence-classification"},
        "data": {
            "path": str(reviews(tmp_path / "reviews.tsv", rows=460)),
            "format": "tsv",
            "labels": [0, 1],
            "label_names": ["negative", "positive"],
            "max_rows": 400,
            "max_length": 32,
            "curation": {"dedupe": "normalized", "conflicts": "drop"},
            "split": {"validation": 0.2, "test": 0.2, "seed": 3},
        },
        "train": {"batch_size": 16, "max_steps": 16, "eval_every_steps": 8, "checkpoint_every_steps": 8},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tune": {
            "algorithm": "random",
            "metric": "eval_accuracy",
            "mode": "max",
            "num_samples": 1,  # once through the grid: 2 trials
            "search_space": {"train.lr": {"type": "grid", "values": [1e-2, 1e-3]}},
        },
        "serve": {"port": port, "max_batch_size": 8, "batch_wait_timeout_s": 0.005},
        "bench": {"concurrency": [1, 4], "requests": 40, "warmup_requests": 4},
        # what the seeded run reaches, with a margin (test accuracy 0.9125, macro F1 0.912, p95 at concurrency 1
        # 17.8 ms on this machine): a chance-level winner (0.5) or a server fifty times slower is refused
        "promote": {"min_test_accuracy": 0.85, "min_test_f1": 0.85, "max_p95_latency_ms": 1000},
        "eval": {
            "data": [str(held_out(tmp_path))],
            "edge_cases": str(edge_cases(tmp_path)),
            "slice_columns": ["source"],
        },
    }
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_run_goes_from_data_to_report_and_a_rerun_skips_what_is_done(tiny_bert, tmp_path):
    env = {**os.environ, "RAYTUNE_FT_STATE_DIR": str(tmp_path / "state")}
    port = free_port()
    exp = experiment(tmp_path, tiny_bert, port)
    root = tmp_path / "runs" / "e2e"
    try:
        # SIGINT ignored, as a script's `raytune-ft run ... &` has it: the background server inherits that, and
        # `serve stop` must still stop it (it used to give up after 60 s, signal SIGTERM and return while the
        # server still held the port, and a server started next joined the dying one)
        done = cli("run", str(exp), env=env, sigint_ignored=True)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        server_pid = int(re.search(r"server pid (\d+)", done.stderr).group(1))
        # live progress: the stage, and after each trial report the trials and the best metric so far
        assert "[2/7] tune" in done.stderr and "trials finished" in done.stderr and "best eval_accuracy" in done.stderr
        assert "% of steps, ETA" in done.stderr
        state = json.loads((root / "run.json").read_text())
        assert {s: state["stages"][s]["state"] for s in STAGES} == {
            "data": "done",
            "tune": "done",
            "eval": "done",
            "promote": "passed",
            "serve": "done",
            "bench": "done",
            "report": "done",
        }

        # the winner is one of the trials, tested once on the test split
        summary = state["summary"]
        trials = list(csv.DictReader(open(root / "tune" / "trials.csv")))
        assert len(trials) == 2
        assert float(summary["hyperparameters"]["train.lr"]) in {float(t["train.lr"]) for t in trials}
        winner = root / "tune" / "winner"
        tested = json.loads((winner / "test_metrics.json").read_text())
        assert summary["test"]["test_accuracy"] == tested["test_accuracy"] and "test_f1_macro" in tested
        assert len(reads_of_test_split(root / "data")) == 1
        assert json.loads((root / "promotion.json").read_text())["promoted"] is True

        # the eval stage judged the winner on the held-out file, apart from the test split, and its card says so
        evaluated = json.loads((winner / "eval" / "held_out" / "eval.json").read_text())
        assert evaluated["metrics"]["rows"] == 60 and set(evaluated["slices"]) == {"length", "source"}
        assert 0 <= evaluated["calibration"]["ece"] <= 1 and evaluated["edge_cases"]["cases"] == 5
        assert summary["eval"]["held_out"]["accuracy"] == evaluated["metrics"]["accuracy"]
        card = (winner / "README.md").read_text()
        assert "## Evaluation on" in card and "test (read once)" in card and "raytune-ft train experiment.yaml" in card

        # the served app answers like the export does in this process, on texts the run never sent
        from raytune_ft.serve.model import LoadedModel

        texts = load_split(root / "data", "validation").column("text").to_pylist()[32:64]
        url = json.loads((root / "serve.json").read_text())["url"]
        assert url == f"http://127.0.0.1:{port}"
        request = urllib.request.Request(
            f"{url}/v1/classify", json.dumps({"text": texts}).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            served = [p["label_id"] for p in json.loads(response.read())["predictions"]]
        assert served == [p["label_id"] for p in LoadedModel(winner).classify(texts)]

        # the benchmark measured every configured level, without errors
        bench = json.loads((root / "bench" / "serve.json").read_text())
        assert [lv["concurrency"] for lv in bench["levels"]] == [1, 4]
        assert all(lv["errors"] == 0 and lv["requests"] == 40 and lv["p95_ms"] > 0 for lv in bench["levels"])
        html = (root / "report.html").read_text()
        assert "Promotion: promoted" in html and "Serving" in html and html.count("data:image/png;base64,") >= 3
        assert "served at" in done.stdout and str(root) in done.stdout.replace("\n", "")

        # the server the run left running, measured from the command line: `bench serve` and `bench soak`
        bench_serve_and_soak(url, tmp_path, env)

        # a rerun: data, tune and serve are complete, so they are reused; the test split is not read again
        again = cli("run", str(exp), "--until", "serve", env=env)
        assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
        stages = json.loads((root / "run.json").read_text())["stages"]
        assert [stages[s]["state"] for s in ("data", "tune", "serve")] == ["reused", "reused", "reused"]
        assert len(reads_of_test_split(root / "data")) == 1
    finally:
        stopped = cli("serve", "stop", env=env)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped the server" in stopped.stderr
    # gone when `serve stop` returns, SIGINT ignored and all
    with pytest.raises(ProcessLookupError):
        os.kill(server_pid, 0)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/healthz", timeout=5)
    assert not list((tmp_path / "state").glob("serve-*.json"))

    # a stricter gate: the winner is refused with the threshold named, and nothing is served
    refused = cli("run", str(exp), "promote.min_test_accuracy=1.0", "--from", "promote", env=env)
    assert refused.returncode == 3, refused.stderr[-3000:]
    assert "not promoted: min_test_accuracy (limit 1" in refused.stderr
    assert json.loads((root / "run.json").read_text())["stages"]["promote"]["state"] == "not promoted"
    assert not list((tmp_path / "state").glob("serve-*.json"))


def bench_serve_and_soak(url: str, tmp_path: Path, env: dict) -> None:
    """`bench serve` (closed loop at 1 and 8 clients, open loop at 50 req/s, the in-process floor, the no-op Serve
    app, a plot) and a short `bench soak` (two windows with the replica's memory) against URL."""
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["--concurrency", "1,8", "--rates", "50", "--requests", "60", "--warmup", "5", "--baseline-noop"]
    bench = cli("bench", "serve", url, *args, "--json", str(out), "--plot", str(plot), env=env)
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

    soaked = tmp_path / "soak.json"
    soak = cli("bench", "soak", url, "--rate", "10", "--duration", "6", "--window", "3", "--json", str(soaked), env=env)
    assert soak.returncode == 0, soak.stderr[-3000:]
    figures = json.loads(soaked.read_text())
    assert figures["requests"] == 60 and figures["errors"] == 0, figures["error_kinds"]
    assert [w["requests"] for w in figures["windows"]] == [30, 30]
    assert all(m["replica_rss_mb"] for m in figures["memory"])
    assert "soak at 10 req/s for 6 s" in soak.stdout
