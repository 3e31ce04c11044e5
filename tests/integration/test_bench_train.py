"""`raytune-ft bench train` as a user runs it: a subprocess that joins the pytest session's Ray (cluster.address; an
embedded start is test_run.py's), a tiny BERT, a JSON file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers import write_reviews

pytestmark = pytest.mark.integration
KEYS = {"samples_per_s", "tokens_per_s", "time_to_first_step_s", "peak_rss_mb"}


def test_bench_train_compares_bare_and_ray_and_measures_zero_memory(tiny_bert, tmp_path, session_ray_address):
    data = write_reviews(tmp_path / "reviews.tsv", rows=480)
    experiment = {
        "name": "bench-tiny",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(tiny_bert), "task": "sequence-classification"},
        "data": {"path": str(data), "max_length": 16, "split": {"validation": 0.1, "test": 0.1}},
        "finetune": {"method": "lora", "lora": {"r": 4, "target_modules": ["query", "value"]}},
        "deepspeed": {"zero_stage": 2},
        "train": {"batch_size": 4},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(experiment))
    out = tmp_path / "figures" / "bench.json"
    cmd = [sys.executable, "-m", "raytune_ft.cli", "bench", "train", str(path), "--steps", "4"]
    cmd += [f"cluster.address={session_ray_address}"]
    cmd += ["--zero-stages", "0,3", "--memory-model", "tiny", "--json", str(out)]
    env = {**os.environ}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "no-op TorchTrainer time to first step" in done.stdout
    figures = json.loads(out.read_text())

    assert set(figures["bare"]) >= KEYS and set(figures["ray"]) >= KEYS
    for side in ("bare", "ray"):
        assert all(figures[side][k] > 0 for k in KEYS), figures[side]
    assert figures["ratio"] == pytest.approx(figures["ray"]["samples_per_s"] / figures["bare"]["samples_per_s"])
    assert figures["global_batch"] == 8 and figures["workers"] == 2
    # the bare loop ran with the threads the two workers had between them
    assert figures["bare"]["threads"] == min(2, os.cpu_count())
    assert 0 < figures["noop_time_to_first_step_s"]
    # the loop's own start-up is part of (and so shorter than) its time to first step
    startup = figures["ray"]["startup_s"]
    assert startup["loop_until_engine"] + startup["engine_until_first_step"] < figures["ray"]["time_to_first_step_s"]
    assert figures["trainable_params"] < figures["params"]  # LoRA

    memory = figures["memory"]
    assert set(memory["stages"]) == {"0", "3"}
    zero0, zero3 = memory["stages"]["0"], memory["stages"]["3"]
    # ZeRO-3 splits parameters, gradients and Adam states over the 2 workers; ZeRO-0 keeps all of them on each
    assert zero3["model_state_mb"] < zero0["model_state_mb"]
    assert zero3["estimator_mb"] < zero0["estimator_mb"]
    assert memory["zero3_vs_zero0"] == pytest.approx(zero3["model_state_mb"] / zero0["model_state_mb"])
    # nothing of the benchmark is left in the run directory
    assert not (tmp_path / "runs" / "bench-tiny" / "train").exists()
