"""`raytune-ft bench tune` as a user runs it: Tune's overhead with a trivial trainable and the real engine (tiny
BERT), memory per trial, and a search comparison, through the CLI, on the pytest session's Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers import write_reviews

pytestmark = pytest.mark.integration


def test_bench_tune_measures_overhead_memory_and_compares_searches(tiny_bert, tmp_path, session_ray_address):
    data = write_reviews(tmp_path / "reviews.tsv", rows=120)
    experiment = {
        "name": "bench-tune",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(tiny_bert), "task": "sequence-classification"},
        "data": {"path": str(data), "max_length": 16, "split": {"validation": 0.2, "test": 0.1}},
        "train": {"batch_size": 4, "max_steps": 4, "eval_every_steps": 2, "checkpoint_every_steps": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tune": {
            "metric": "eval_accuracy",
            "mode": "max",
            "search_space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1}},
        },
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment))
    out = tmp_path / "bench.json"
    # on the pytest session's Ray (cluster.address): the embedded start is what test_bench_train.py's command pays
    cmd = [sys.executable, "-m", "raytune_ft.cli", "bench", "tune", str(path), f"cluster.address={session_ray_address}"]
    cmd += ["--trials", "2", "--steps", "2"]
    cmd += ["--compare", "random", "--seeds", "1", "--samples", "2", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Tune overhead" in done.stdout and "at equal compute" in done.stdout
    r = json.loads(out.read_text())

    for label in ("sequential", "packed"):
        trivial = r["trivial"][label]
        assert trivial["trials"] == 2 and trivial["trials_per_min"] > 0 and trivial["wall_s"] > 0
    assert r["trivial"]["sequential"]["gap_s"]["n"] == 1 and r["trivial"]["sequential"]["gap_s"]["mean"] > 0

    engine = r["engine"]
    assert engine["trials"] == 2 and engine["steps_per_trial"] == 2
    assert engine["gap_s"]["n"] == 1 and engine["gap_s"]["mean"] > 0  # one trial after the other
    assert engine["first_report_s"]["min"] > 0
    for trial in engine["per_trial"]:
        assert trial["worker_peak_rss_mb"] > 0 and trial["driver_rss_mb_after"] > 0 and trial["used_mb_after"] > 0
    assert engine["memory"]["used_mb"]["first"] > 0

    compare = r["compare"]
    assert compare["metric"] == "eval_accuracy" and compare["samples"] == 2
    [run] = compare["algorithms"]["random"]["runs"]
    assert 0 <= run["best"] <= 1 and compare["algorithms"]["random"]["best"]["mean"] == run["best"]
    assert run["steps_trained"] == 2 * 4  # two trials of max_steps 4: the compute the search spent
    assert "train.lr" in run["best_config"]


def test_bench_tune_refuses_bad_arguments(tiny_bert, tmp_path):
    path = tmp_path / "exp.yaml"
    experiment = {
        "name": "x",
        "model": {"name_or_path": str(tiny_bert), "task": "sequence-classification"},
        "data": {"path": str(write_reviews(tmp_path / "r.tsv", rows=40))},
    }
    path.write_text(yaml.safe_dump(experiment))
    base = [sys.executable, "-m", "raytune_ft.cli", "bench", "tune", str(path)]
    for extra, message in (
        (["--compare", "random,sgd"], "--compare: algorithms are"),
        (["--compare-only"], "--compare-only needs --compare"),
        (["--compare", "random"], "needs a tune.search_space"),
    ):
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, (extra, done.stderr)
