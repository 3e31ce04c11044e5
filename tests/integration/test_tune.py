"""Hyper-parameter search on a real local Ray: trials are Ray Train runs of the engine on a tiny BERT."""

from __future__ import annotations

import csv
import json
import os
import pickle

import pyarrow.parquet as pq
import pytest
from browser import rendered
from conftest import cpus_free_within
from helpers import cli, make_cfg, pbt_pair, write_experiment, write_reviews

from raytune_ft.config import load_config
from raytune_ft.data import reads_of_test_split
from raytune_ft.report import write_report
from raytune_ft.tune import tune_experiment
from raytune_ft.tune.runner import schedule, trial_id_of

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


def test_pbt_winner_exploited_the_donor_checkpoint_is_tested_once_and_replays(tiny_bert, tmp_path, session_ray_address):
    data = write_reviews(tmp_path / "reviews.tsv", rows=200)
    # Two trials, quantile 0.5: at step 8 the one at lr 1e-6 (which learns nothing) is the lower half and exploits
    # the other: its step-8 checkpoint, and its lr doubled (factors 2 and 2). From the same weights, the doubled
    # rate learns faster (seeded: eval loss 0.54 against the donor's 0.68 at step 16), so the winner is the trial
    # that exploited, and the winner's schedule (pbt_policy.txt, card, replay) is what is tested.
    tune = pbt_pair(8, keep_checkpoints=1, perturbation_factors=[2.0, 2.0])
    # a constant learning rate, so that every report's lr is the trial's configured one
    train = {"lr_schedule": "constant", "warmup_ratio": 0, "batch_size": 16}
    cfg = tune_cfg(tmp_path / "runs", "pbt", tiny_bert, data, tune, train=train)
    search = tmp_path / "search"
    found = tune_experiment(cfg, search)
    # every paused run's workers and placement group are gone (trial._abort_run): a paused run that lived on
    # held a CPU, and the population's other member waited for it for minutes
    assert cpus_free_within(30.0)

    exploits = [json.loads(line) for line in (search / "exploits.jsonl").read_text().splitlines()]
    [exploit] = exploits  # one perturbation point (step 8 of 16), one trial in the lower half
    assert exploit["donor"] != exploit["trial"]
    assert exploit["restored_step"] == exploit["donor_step"] == 8  # the donor's DeepSpeed checkpoint, step included
    assert exploit["bytes_moved"] > 0 and exploit["seconds"] > 0
    assert exploit["old_config"]["train.lr"] == 1e-6 and exploit["new_config"]["train.lr"] == pytest.approx(6e-3)
    rows = list(csv.DictReader(open(search / "trials.csv")))
    # both train to step 16, the exploiting trial included (search.RestartsClean)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    assert {r["last_step"] for r in rows} == {"16"}
    assert pq.read_table(search / "trials.parquet").num_rows == 2
    # the winner is the trial that exploited, trained with the lr it inherited doubled
    assert trial_id_of(found.best_trial) == exploit["trial"]
    assert found.best_config == {"train.lr": pytest.approx(6e-3)}
    assert (found.winner_dir / "model.safetensors").is_file()
    tested = found.test_metrics
    # the toy task is balanced (majority class: 0.5); the seeded winner reaches 0.95 on its 20 test rows
    assert tested["test_rows"] == 20 and tested["test_accuracy"] >= 0.8
    assert json.loads((found.winner_dir / "test_metrics.json").read_text()) == tested
    card = (found.winner_dir / "README.md").read_text()  # rewritten once the test metrics and schedule are in
    assert "test (read once)" in card and "Population-based training schedule" in card
    policy = schedule((found.winner_dir / "pbt_policy.txt").read_text())
    assert json.loads((found.winner_dir / "schedule.json").read_text()) == policy
    assert [c["config"]["train.lr"] for c in policy] == [pytest.approx(3e-3), pytest.approx(6e-3)]
    data_dir = tmp_path / "runs" / "pbt" / "data"
    assert len(reads_of_test_split(data_dir)) == 1  # the test split is read once, after the search
    # keep-K pruning ran (fewer folders than checkpoints reported) yet never removed one an exploit or a
    # restart needed: both trials ended TERMINATED
    trials = list((search / "trials").glob("run_trial_*"))
    kept = sum(len(list(t.glob("checkpoint_*"))) for t in trials)
    assert kept < sum(int(r["iterations"]) for r in rows)

    # tracking: every report in MLflow (the SQLite store in the run directory) and in TensorBoard event files
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{search / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "pbt"]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")]
        assert steps and set(steps) <= {4, 8, 12, 16}  # plotted against the optimizer step
    for trial in trials:
        events = b"".join(p.read_bytes() for p in trial.glob("events.out.tfevents.*"))
        assert b"eval_loss" in events and b"hp/train.lr" in events

    # the report of this real run: curves, PBT schedules, search view, winner with its confusion matrix
    report = write_report(search)
    html = report.read_text()
    assert html.count("data:image/png;base64,") >= 4 and "Confusion" in html
    # ... and as a reader sees it, in headless Chromium: every figure decoded and shown, every table's rows real
    # rows as wide as its header (the model card's Markdown tables once showed their |---|---| separator as a
    # row), the card's fine-tuning table with the settings that applied to this full fine-tuning and no LoRA ones
    page = rendered(report)
    alts = {i["alt"] for i in page["images"]}
    assert {"learning curves", "hyper-parameter schedule", "search view", "confusion matrix"} <= alts, alts
    assert all(i["width"] > 0 and i["height"] > 0 and i["shown"] > 0 for i in page["images"]), page["images"]
    for table in page["tables"]:
        rows = table["rows"]
        assert all(set("".join(row)) - set("-:| ") for row in rows), table
        assert {len(row) for row in rows} == {len(rows[0])}, table
    [settings] = [t["rows"] for t in page["tables"] if t["heading"] == "Fine-tuning"]
    assert settings[0] == ["setting", "value"] and ["finetune.method", "full"] in settings
    assert ["train.lr", "0.006"] in settings and ["seed", str(cfg.seed)] in settings
    assert not [row for row in settings if row[0].startswith("finetune.lora.")], settings
    [metrics] = [t["rows"] for t in page["tables"] if t["heading"] == "Metrics"]
    assert any(row[0] == "accuracy" and row[2] == "test (read once)" for row in metrics), metrics

    env = {**os.environ}
    # the directory holds a finished search: a new search there is refused before anything starts
    experiment_file = write_experiment(tmp_path / "pbt.yaml", cfg)
    again = cli("tune", str(experiment_file), "--run-dir", str(search), env=env)
    assert again.returncode == 1 and "already holds a finished search" in again.stderr, again.stderr[-2000:]

    # `tune --replay RUN_DIR` with its defaults replays the winner's schedule: it starts from the config the trial
    # inherited and switches where PBT switched it, and the engine trains with each value (constant schedule:
    # reported lr == configured lr). KEY=VALUE overrides after --replay apply to the search's experiment: here
    # the session's Ray to join, and one that changes nothing the schedule depends on.
    overrides = [f"cluster.address={session_ray_address}", "train.keep_checkpoints=3"]
    replayed = cli("tune", "--replay", str(search), *overrides, env=env)
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    export = search / "replays" / "winner" / "winner"
    assert f"replayed schedule exported to {export}" in replayed.stdout.replace("\n", "")
    assert (export / "model.safetensors").is_file()
    assert load_config(search / "replays" / "winner" / "config.yaml").train.keep_checkpoints == 3
    [replay] = (search / "replays" / "winner" / "trials").glob("run_trial_*")
    reports = [json.loads(line) for line in open(replay / "result.json")]
    assert [r["step"] for r in reports] == [4, 8, 12, 16]  # every report, across the switch
    for report in reports:
        expected = [c["config"] for c in policy if c["from_iteration"] < report["training_iteration"]][-1]
        assert report["hp/train.lr"] == pytest.approx(expected["train.lr"])
        assert report["lr"] == pytest.approx(expected["train.lr"])
    assert len(reads_of_test_split(data_dir)) == 1  # a replay does not touch the test split


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
        "mlflow": False,  # MLflow's store is the PBT test's to check
        # one at a time: which trials ASHA stops depends on the order they reach a rung, and two trials side by
        # side reach it in whichever order the two cores run them; in sequence (seeded TPE, deterministic
        # training) the outcome is the same on every run
        "max_concurrent_trials": 1,
        "search_space": {
            "train.lr": {"type": "loguniform", "low": 1e-6, "high": 1e-1},
            # a conditional key: Optuna gets the space as define-by-run code and suggests a rank only for LoRA
            "finetune.method": {"type": "choice", "values": ["full", "lora"]},
            "finetune.lora.r": {"type": "int", "low": 2, "high": 8, "when": {"finetune.method": "lora"}},
        },
    }
    finetune = {"lora": {"r": 4, "target_modules": ["query", "value"]}}
    cfg = tune_cfg(tmp_path / "runs", "optuna", tiny_bert, data, tune, train={"max_steps": 12}, finetune=finetune)
    found = tune_experiment(cfg, tmp_path / "search")

    rows = list(csv.DictReader(open(tmp_path / "search" / "trials.csv")))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"TERMINATED", "STOPPED"}  # ASHA stopped some
    assert len({r["train.lr"] for r in rows}) == 4  # Optuna proposed four different points
    for row in rows:
        assert (row["finetune.lora.r"] != "") == (row["finetune.method"] == "lora"), row
    # TPE was told every trial's result (ASHA-stopped ones included), as the losses the engine reported
    [state] = (tmp_path / "search" / "trials").glob("searcher-state-*.pkl")
    study = pickle.loads(state.read_bytes())["_ot_study"]
    told = [t.value for t in study.trials if t.state.name == "COMPLETE"]
    reported = set()
    for folder in (tmp_path / "search" / "trials").glob("run_trial_*"):
        reported |= {round(json.loads(line)["eval_loss"], 6) for line in open(folder / "result.json")}
    assert len(told) == 4 and {round(v, 6) for v in told} <= reported
    iterations = [int(r["iterations"]) for r in rows]
    assert min(iterations) < max(iterations) == 3  # ASHA stopped at least one trial before its last evaluation
    best = min(float(r["best_eval_loss"]) for r in rows)
    assert found.best_metrics["eval_loss"] == pytest.approx(best)
