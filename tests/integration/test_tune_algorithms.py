"""Every search algorithm and scheduler end to end on a real local Ray (tiny BERT, a few steps per trial), and one
search with two trials that keep failing (one cannot build its model, one has its workers killed from outside):
each retried, then marked failed, and the search goes on to a winner."""

from __future__ import annotations

import csv
import json
import pickle
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import search_ran_to_a_winner, write_reviews
from test_tune import tune_cfg

from raytune_ft.train.checkpoint import checkpoint_step
from raytune_ft.tune import tune_experiment

pytestmark = pytest.mark.integration

LR = {"type": "loguniform", "low": 1e-5, "high": 1e-1}
# grid runs in the failing-trials test below; Optuna TPE + ASHA and PBT in test_tune.py; random sampling with the
# median stopping rule in test_autoscaling.py (the search that makes the autoscaler add nodes)
CASES = {
    "hyperopt": ({"algorithm": "hyperopt", "num_samples": 2}, {"train.lr": LR}),
    "bohb": (
        {"algorithm": "bohb", "scheduler": "hyperband", "num_samples": 2},
        {"train.lr": LR, "finetune.lora.r": {"type": "int", "low": 2, "high": 8}},
    ),
    "pb2": (
        {"algorithm": "pb2", "num_samples": 2, "perturbation_interval": 4},
        {"train.lr": {"type": "uniform", "low": 1e-4, "high": 1e-2}},
    ),
}


def searcher_state(run_dir):
    [path] = (run_dir / "trials").glob("searcher-state-*.pkl")
    return pickle.loads(path.read_bytes())


def reported_losses(run_dir) -> set[float]:
    reported = set()
    for folder in (run_dir / "trials").glob("run_trial_*"):
        reported |= {round(json.loads(line)["eval_loss"], 6) for line in open(folder / "result.json")}
    return reported


@pytest.mark.parametrize("case", list(CASES))
def test_each_algorithm_runs_end_to_end(case, tiny_bert, tmp_path, local_ray):
    settings, space = CASES[case]
    data = write_reviews(tmp_path / "reviews.tsv", rows=120)
    tune = {"metric": "eval_loss", "mode": "min", "max_concurrent_trials": 2, "mlflow": False, **settings}
    tune["search_space"] = space
    sections = {"train": {"max_steps": 8}}
    if "finetune.lora.r" in space:
        sections["finetune"] = {"method": "lora", "lora": {"r": 4, "target_modules": ["query", "value"]}}
    if case == "pb2":  # trials and checkpoints on a storage URI, apart from the run directory
        tune["storage_path"] = f"file://{tmp_path / 'store'}"
    cfg = tune_cfg(tmp_path / "runs", case.replace("+", "-"), tiny_bert, data, tune, **sections)
    found = tune_experiment(cfg, tmp_path / "search")
    if case == "pb2":
        assert not (tmp_path / "search" / "trials").exists()
        trials = list((tmp_path / "store" / "trials").glob("run_trial_*"))
        assert len(trials) == 2 and all(list(t.glob("checkpoint_*")) for t in trials)
        assert len(list((tmp_path / "store" / "train-runs").iterdir())) == 2

    # every report in each trial's result.json also across PB2's restarts (Tune's loggers copy the log back from
    # storage when a trial restarts; reports not yet synced there used to be lost)
    storage = tmp_path / "store" if case == "pb2" else None
    expected = settings["num_samples"]
    search_ran_to_a_winner(tmp_path / "search", space, expected, storage)
    assert found.winner_dir == tmp_path / "search" / "winner"
    if case == "hyperopt":
        # the TPE optimiser was told each trial's result, and proposed the points itself
        told = [t["result"] for t in searcher_state(tmp_path / "search")["_hpopt_trials"].trials]
        assert [r["status"] for r in told] == ["ok"] * expected
        assert {round(r["loss"], 6) for r in told} <= reported_losses(tmp_path / "search")
    if case == "bohb":
        # BOHB's optimiser received the evaluations HyperBandForBOHB closed a rung with (losses are the engine's)
        told = [loss for losses in searcher_state(tmp_path / "search")["bohber"].losses.values() for loss in losses]
        assert told and {round(loss, 6) for loss in told} <= reported_losses(tmp_path / "search")


def kill_train_workers_of_one_trial(
    search: Path, kills: int, last_step: int, done: threading.Event, killed: list
) -> None:
    """A real fault from outside: SIGKILL the Ray Train workers of the first trial each time one of its Ray Train
    runs has written a checkpoint before its last (so it is mid-run, neither starting up nor ending: the workers
    alive are its own), `kills` times; other trials are left alone. Only this test's Ray instance is touched: its
    workers are the raylet's children."""
    import ray

    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
    runs_killed: set[Path] = set()
    while not done.is_set() and len(killed) < kills:
        for run in sorted({step.parent for step in search.glob("train-runs/*/run-*/step_*")} - runs_killed):
            if killed and run.parent.name != killed[0][0]:
                continue  # another trial: it must finish
            if max(checkpoint_step(step) for step in run.glob("step_*")) >= last_step:
                runs_killed.add(run)  # finished: the workers alive may be the next trial's
                continue
            workers = [p for p in raylet.children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
            for worker in workers:
                worker.kill()
            if workers:
                runs_killed.add(run)
                killed.append((run.parent.name, run.name, len(workers)))
        time.sleep(0.2)


def test_failing_trials_are_retried_then_marked_failed_and_the_survivor_wins(tiny_bert, tmp_path, local_ray):
    """Three trials, one at a time in grid order (so the worker processes alive are one trial's): the tiny BERT has
    2 layers, so freezing 5 fails when the trial builds its model, every time it is tried; the next trial's workers
    are SIGKILLed from outside each time one of its runs has written a checkpoint; the third trains to the end."""
    data = write_reviews(tmp_path / "reviews.tsv", rows=120)
    tune = {
        "algorithm": "grid",
        "num_samples": 1,
        "max_failures": 1,
        "max_concurrent_trials": 1,
        "mlflow": False,
        "search_space": {"finetune.freeze.layers": {"type": "grid", "values": [5, 1, 2]}},
    }
    sections = {
        "finetune": {"method": "partial", "freeze": {"layers": 1}},
        # 20 steps, a checkpoint every 4: a run killed at its first checkpoint may still reach step 8 before the
        # kill lands, and the retry resumed there still writes one (12) before its last, for the second kill
        "train": {"max_steps": 20, "max_failures": 0},
    }
    cfg = tune_cfg(tmp_path / "runs", "failing", tiny_bert, data, tune, **sections)
    search = tmp_path / "search"
    done, killed = threading.Event(), []
    killer = threading.Thread(target=kill_train_workers_of_one_trial, args=(search, 2, 20, done, killed))
    killer.start()
    try:
        found = tune_experiment(cfg, search)
    finally:
        done.set()
        killer.join()

    rows = {r["finetune.freeze.layers"]: r for r in csv.DictReader(open(search / "trials.csv"))}
    assert set(rows) == {"5", "1", "2"}
    # tried twice (tune.max_failures: 1), each try a Ray Train run of its own, then marked failed with the cause
    assert rows["5"]["status"] == "ERROR"
    assert "finetune.freeze.layers is 5 but the model has only 2 layers" in rows["5"]["error"]
    assert sorted(p.name for p in (search / "train-runs" / rows["5"]["trial_id"]).iterdir()) == ["run-0", "run-1"]
    # its worker died in both tries (train.max_failures 0, tune.max_failures 1): two Ray Train runs, both killed
    assert [(run, n) for _, run, n in killed] == [("run-0", 1), ("run-1", 1)]
    dead = rows["1"]
    assert killed[0][0] == dead["trial_id"]
    assert dead["status"] == "ERROR" and "worker process has died" in dead["error"], dead
    survivor = rows["2"]
    assert survivor["status"] == "TERMINATED" and int(survivor["last_step"]) == 20
    assert found.best_config == {"finetune.freeze.layers": 2}
    assert (found.winner_dir / "model.safetensors").is_file()
