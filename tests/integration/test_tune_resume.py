"""`raytune-ft tune` killed mid-search (SIGKILL to the driver and its embedded Ray), then `tune --resume`: the
finished trial is kept as it was, the interrupted one continues from its checkpoint, the rest run."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time

import pytest
import yaml
from helpers import checkpoints_written, kill_session, reports, trial_states, write_reviews

pytestmark = pytest.mark.integration


def test_tune_resumes_after_the_driver_is_killed(tiny_bert, tmp_path):
    data = write_reviews(tmp_path / "reviews.tsv", rows=400)
    last_step = 60
    experiment = {
        "name": "resume",
        "seed": 7,
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(tiny_bert), "task": "sequence-classification"},
        "data": {"path": str(data), "max_length": 16, "split": {"validation": 0.2, "test": 0.1}},
        # a checkpoint every 4 steps: the second trial is mid-run for a few seconds, long enough to be caught
        "train": {
            "lr": 1e-2,
            "batch_size": 4,
            "max_steps": last_step,
            "eval_every_steps": 4,
            "checkpoint_every_steps": 4,
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tune": {
            "algorithm": "grid",
            "max_concurrent_trials": 1,  # one after the other: the kill lands between a finished and a running one
            "mlflow": False,
            "search_space": {"train.lr": {"type": "grid", "values": [1e-2, 3e-3, 1e-3]}},
        },
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment))
    search = tmp_path / "search"
    # Tune saves its experiment state every few seconds; each second here, so the test can see where it stands
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    cli = [sys.executable, "-m", "raytune_ft.cli", "tune"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        [*cli, str(path), "--run-dir", str(search)], stdout=log, stderr=log, env=env, start_new_session=True
    )
    deadline = time.time() + 600
    finished = running = None
    while time.time() < deadline and first.poll() is None:
        states = trial_states(search) if (search / "trials").exists() else {}
        done = [t for t, s in states.items() if s == "TERMINATED"]
        folders = {"_".join(f.name.split("_")[2:4]): f for f in (search / "trials").glob("run_trial_*")}
        # reported (in its result.json) and still training
        live = [t for t, s in states.items() if s == "RUNNING" and t in folders and reports(folders[t])]
        live = [t for t in live if max(checkpoints_written(search, t), default=0) < last_step]
        if done and live:
            finished, running = done[0], live[0]
            break
        time.sleep(0.1)
    assert finished and running, (tmp_path / "first.log").read_text()[-3000:]
    kill_session(first)
    written = checkpoints_written(search, running)
    before = {t: reports(f) for t, f in folders.items()}
    assert [r["step"] for r in before[finished]] == list(range(4, last_step + 1, 4))

    again = subprocess.run([*cli, "--resume", str(search)], capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]

    rows = list(csv.DictReader(open(search / "trials.csv")))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"TERMINATED"}
    assert sorted(float(r["train.lr"]) for r in rows) == [1e-3, 3e-3, 1e-2]
    folders = {"_".join(f.name.split("_")[2:4]): f for f in (search / "trials").glob("run_trial_*")}
    # the finished trial was neither rerun nor continued: same reports, one Ray Train run
    assert reports(folders[finished]) == before[finished]
    assert [p.name for p in (search / "train-runs" / finished).iterdir()] == ["run-0"]
    # the interrupted trial went on from the checkpoint it had reported (or a newer whole one on disk, when the
    # kill beat Tune's saving of its experiment state), not from step 0
    after = reports(folders[running])
    resumed = [r for r in after if r.get("resumed_step")]
    assert resumed, after[:1]
    assert max(written) >= resumed[0]["resumed_step"] >= before[running][-1]["step"] >= 4, (resumed[0], written)
    assert after[-1]["step"] == last_step
    assert (search / "winner" / "test_metrics.json").is_file()
