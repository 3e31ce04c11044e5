"""Forgetting as a guard during search, on a real local Ray: a tiny Llama trained on letters, with a retain set of
digits it has never seen in training. At every evaluation the loop scores the retain set against the model before
its first step; Tune stops the trial whose retain perplexity rose past tune.max_forgetting, the gentle one runs on."""

from __future__ import annotations

import csv
import json
import random

import pytest

from raytune_ft.config.loader import validate_raw
from raytune_ft.tune import tune_experiment

pytestmark = pytest.mark.integration


def test_a_trial_that_forgets_too_much_is_stopped(tiny_llama, tmp_path, local_ray):
    rng = random.Random(0)
    # one paragraph per line of words (a text file's documents are blank-line separated)
    letters = "\n\n".join(
        " ".join(rng.choice(["good", "bad", "movie", "film", "the"]) for _ in range(12)) for _ in range(300)
    )
    digits = "\n\n".join(" ".join(str(rng.randint(0, 9)) for _ in range(12)) for _ in range(40))
    (tmp_path / "train.txt").write_text(letters)
    (tmp_path / "retain.txt").write_text(digits)
    raw = {
        "name": "guard",
        "seed": 1,
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(tiny_llama), "task": "causal-lm"},
        "data": {"path": str(tmp_path / "train.txt"), "block_size": 16, "split": {"validation": 0.1, "test": 0.1}},
        "train": {
            "batch_size": 4,
            "max_steps": 8,
            "eval_every_steps": 2,
            "checkpoint_every_steps": 4,
            "lr_schedule": "constant",
            "warmup_ratio": 0,
            "retain_path": str(tmp_path / "retain.txt"),
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tune": {
            "algorithm": "grid",
            "metric": "eval_loss",
            "mode": "min",
            "max_concurrent_trials": 2,
            "mlflow": False,
            "max_forgetting": 0.5,
            "search_space": {"train.lr": {"type": "grid", "values": [1e-7, 3e-2]}},
        },
    }
    cfg = validate_raw(raw, None, "guard.yaml", [], base_dir=tmp_path)
    tune_experiment(cfg, tmp_path / "search")

    rows = {float(r["train.lr"]): r for r in csv.DictReader(open(tmp_path / "search" / "trials.csv"))}
    reports = {}
    for lr, row in rows.items():
        lines = open(tmp_path / "search" / "trials" / row["trial"] / "result.json").read().splitlines()
        reports[lr] = [json.loads(line) for line in lines if line.strip()]
    for got in reports.values():
        # the reference is the model before its first step; every evaluation scores the retain set against it
        assert all(r["eval_retain_before"] == got[0]["eval_retain_before"] for r in got)
        assert all(
            r["eval_retain_worse_by"] == pytest.approx(r["eval_retain_perplexity"] / r["eval_retain_before"] - 1)
            for r in got
        )
    gentle, harsh = reports[1e-7], reports[3e-2]
    assert [r["step"] for r in gentle] == [2, 4, 6, 8]  # ran on to the end, and forgot nothing
    assert abs(gentle[-1]["eval_retain_worse_by"]) < 0.01
    # learning the letters pushed probability off the digits: stopped at the first evaluation past the limit
    assert harsh[-1]["eval_retain_worse_by"] > 0.5 and harsh[-1]["step"] < 8
    assert all(r["eval_retain_worse_by"] <= 0.5 for r in harsh[:-1])
    assert rows[3e-2]["status"] == "STOPPED"
