"""`raytune-ft bench lm` as a user runs it on CPU (on a GPU the same command measures bf16 throughput and MFU):
a subprocess on the session's Ray (`--address`; an embedded start is test_run.py's), a tiny Llama from a config,
the JSON it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
SIDE_KEYS = {"tokens_per_s", "samples_per_s", "peak_rss_mb", "time_to_first_step_s", "mfu", "mfu_6n", "n_params"}


def bench_lm(tmp_path, address: str, *args: str) -> tuple[dict, str]:
    out = tmp_path / "lm.json"
    cmd = [sys.executable, "-m", "raytune_ft.cli", "bench", "lm", "--size", "tiny", "--seq-len", "64"]
    cmd += ["--micro-batch", "2", "--steps", "3", "--device", "cpu", "--address", address, "--json", str(out), *args]
    env = {**os.environ}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout


def test_each_zero_stage_and_method_runs_through_ray_and_through_bare_deepspeed(tmp_path, session_ray_address):
    # ZeRO-3 (partitioned parameters, the harder case to count and gather) with both methods; ZeRO-2 runs in the
    # Ray loop below and in `bench train`'s bare loop, which starts its engine with the same code. Half the cost of
    # the whole 2x2 grid, which the README's CPU figures show.
    figures, table = bench_lm(tmp_path, session_ray_address, "--zero-stages", "3", "--methods", "full,lora")
    assert (figures["size"], figures["seq_len"], figures["workers"]) == ("tiny", 64, 1)
    runs = {(r["zero_stage"], r["method"]): r for r in figures["runs"]}
    assert set(runs) == {(3, "full"), (3, "lora")}
    for run in runs.values():
        for side in ("ray", "bare"):
            assert set(run[side]) >= SIDE_KEYS, run[side]
            assert run[side]["tokens_per_s"] > 0 and run[side]["time_to_first_step_s"] > 0
            # tokens are blocks x 64: every position of a packed block counts
            assert run[side]["tokens_per_s"] == pytest.approx(64 * run[side]["samples_per_s"])
            assert run[side]["mfu"] is None and run[side]["device"] == "cpu"  # MFU is a GPU figure
            # ZeRO-3's partitions counted whole; LoRA adds its adapters to the base model's parameters
            adapters = run[side]["n_trainable"] if run["method"] == "lora" else 0
            assert run[side]["n_params"] == figures["params"] + adapters
        assert run["ray_vs_bare"] == pytest.approx(run["ray"]["tokens_per_s"] / run["bare"]["tokens_per_s"])
        # both sides trained the same model with the same method
        assert run["ray"]["n_trainable"] == run["bare"]["n_trainable"]
    assert runs[(3, "lora")]["ray"]["n_trainable"] < runs[(3, "full")]["ray"]["n_trainable"] == figures["params"]
    assert "Ray/bare" in table and "tokens/s" in table


def test_activation_checkpointing_compile_and_fused_adamw_run_in_the_ray_loop(tmp_path, session_ray_address):
    args = ["--zero-stages", "2", "--methods", "full", "--no-bare", "--activation-checkpointing", "--compile"]
    figures, _ = bench_lm(tmp_path, session_ray_address, *args, "--fused-adamw")
    [run] = figures["runs"]
    assert "bare" not in run and run["ray"]["tokens_per_s"] > 0
    assert figures["engine"] == {
        "precision": "auto",
        "attn": "auto",
        "activation_checkpointing": True,
        "compile_model": True,
        "fused_adamw": True,
    }
