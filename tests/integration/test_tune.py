"""Hyper-parameter search on a real local Ray: trials are Ray Train runs of the engine on a tiny BERT."""

from __future__ import annotations

import csv
import json

import pytest
from test_train import make_cfg, write_reviews

from raytune_ft.data import reads_of_test_split
from raytune_ft.tune import tune_experiment

pytestmark = pytest.mark.integration


def tune_cfg(root, name, tiny_bert, data, tune, **sections):
    train = {"max_steps": 16, "eval_every_steps": 4, "checkpoint_every_steps": 4, "batch_size": 4, "epochs": 40}
    return make_cfg(
        root,
        name,
        tiny_bert,
        data,
        train={**train, **sections.pop("train", {})},
        scaling={"num_workers": 1, "cpus_per_worker": 1},
        tune=tune,
        **sections,
    )


def test_pbt_exploit_restores_the_donor_checkpoint_and_the_winner_is_tested_once(tiny_bert, tmp_path, local_ray):
    data = write_reviews(tmp_path / "reviews.tsv", rows=200)
    tune = {
        "algorithm": "pbt",
        "metric": "eval_loss",
        "mode": "min",
        "num_samples": 1,
        "perturbation_interval": 8,
        "quantile_fraction": 0.5,
        "resample_probability": 0.0,
        "synch": True,  # both trials meet at step 8 however unevenly the two cores start them
        "keep_checkpoints": 1,
        # one learning rate learns, the other barely moves: the slow trial must exploit the fast one
        "search_space": {"train.lr": {"type": "grid", "values": [1e-2, 1e-6]}},
    }
    cfg = tune_cfg(tmp_path / "runs", "pbt", tiny_bert, data, tune)
    found = tune_experiment(cfg, tmp_path / "search")

    exploits = [json.loads(line) for line in (tmp_path / "search" / "exploits.jsonl").read_text().splitlines()]
    assert exploits, "PBT never exploited"
    for e in exploits:
        assert e["donor"] != e["trial"]
        assert e["restored_step"] == e["donor_step"] > 0  # the donor's DeepSpeed checkpoint, step included
        assert e["bytes_moved"] > 0 and e["seconds"] > 0
        assert e["new_config"]["train.lr"] != e["old_config"]["train.lr"]
    rows = list(csv.DictReader(open(tmp_path / "search" / "trials.csv")))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    assert (found.winner_dir / "model.safetensors").is_file()
    assert found.test_metrics["test_rows"] > 0 and 0 <= found.test_metrics["test_accuracy"] <= 1
    assert json.loads((found.winner_dir / "test_metrics.json").read_text()) == found.test_metrics
    data_dir = tmp_path / "runs" / "pbt" / "data"
    assert len(reads_of_test_split(data_dir)) == 1  # the test split is read once, after the search
    # keep-K pruning ran (fewer folders than checkpoints reported) yet never removed one an exploit or a
    # restart needed: both trials ended TERMINATED
    trials = list((tmp_path / "search" / "trials").glob("run_trial_*"))
    kept = sum(len(list(t.glob("checkpoint_*"))) for t in trials)
    assert kept < sum(int(r["iterations"]) for r in rows)


def test_optuna_with_asha_proposes_points_and_stops_trials_early(tiny_bert, tmp_path, local_ray):
    data = write_reviews(tmp_path / "reviews.tsv", rows=200)
    tune = {
        "algorithm": "optuna",
        "scheduler": "asha",
        "grace_period": 1,
        "reduction_factor": 2,
        "metric": "eval_loss",
        "mode": "min",
        "num_samples": 4,
        "max_concurrent_trials": 2,
        "search_space": {"train.lr": {"type": "loguniform", "low": 1e-6, "high": 1e-1}},
    }
    cfg = tune_cfg(tmp_path / "runs", "optuna", tiny_bert, data, tune, train={"max_steps": 12})
    found = tune_experiment(cfg, tmp_path / "search")

    rows = list(csv.DictReader(open(tmp_path / "search" / "trials.csv")))
    assert len(rows) == 4 and all(r["status"] == "TERMINATED" for r in rows)
    assert len({r["train.lr"] for r in rows}) == 4  # Optuna proposed four different points
    iterations = [int(r["iterations"]) for r in rows]
    assert min(iterations) < max(iterations) == 3  # ASHA stopped at least one trial before its last evaluation
    best = min(float(r["best_eval_loss"]) for r in rows)
    assert found.best_metrics["eval_loss"] == pytest.approx(best)
