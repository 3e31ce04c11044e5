"""`raytune-ft tune` killed mid-search (SIGKILL to the driver and its embedded Ray), then `tune --resume`: the
finished trial is kept as it was, the interrupted one continues from its checkpoint, the rest run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import checkpoints_written, kill_session, pbt_pair, reports, trial_states, write_reviews

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


def exploits_decided(search) -> int:
    """PBT exploits decided so far: Ray's scheduler appends a line to pbt_global.txt at each, as it decides."""
    path = search / "trials" / "pbt_global.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_driver_when(process: subprocess.Popen, ready, log_path, timeout_s: float = 300.0) -> None:
    """SIGKILL the driver (its process group: the session's Ray it joined lives on) once READY() holds."""
    deadline = time.time() + timeout_s
    while not ready():
        assert process.poll() is None, f"the driver ended by itself:\n{log_path.read_text()[-3000:]}"
        assert time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def test_synchronous_pbt_resumes_after_driver_kills_before_and_after_the_first_exploit(
    tiny_bert, tmp_path, session_ray_address, local_ray
):
    """The quick example's search (synchronous PBT over 2 trials side by side, an evaluation and a perturbation
    point every 8 steps) killed twice and resumed twice: once before the first exploit, once right after it. Each
    resume goes on exploiting, and the search ends with one winner, tested once. Before search.SavedSchedule, the
    trials resumed after the first exploit reached step 16 and stayed PAUSED for good. The driver joins the
    session's Ray, as a driver on a cluster does: only the driver dies."""
    from raytune_ft.data import reads_of_test_split

    data = write_reviews(tmp_path / "reviews.tsv", rows=200)
    last_step, interval = 24, 8  # perturbation points at 8 and 16: one exploit each, the lower trial of two
    experiment = {
        "name": "pbt-resume",
        "seed": 7,
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(tiny_bert), "task": "sequence-classification"},
        "data": {"path": str(data), "max_length": 16, "split": {"validation": 0.2, "test": 0.1}},
        "train": {
            "lr": 3e-3,
            "lr_schedule": "constant",
            "batch_size": 16,
            "epochs": 40,
            "max_steps": last_step,
            "eval_every_steps": interval,
            "checkpoint_every_steps": interval,
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "cluster": {"address": session_ray_address},
        # a hang ends as an error that says where the search stood, not as this test's timeout
        "tune": pbt_pair(interval, mlflow=False, stall_timeout_s=60),
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment))
    search = tmp_path / "search"
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Tune saves its state every second, not every few
    cli = [sys.executable, "-m", "raytune_ft.cli", "tune"]

    def start(args: list[str], name: str) -> tuple[subprocess.Popen, object]:
        log = tmp_path / f"{name}.log"
        handle = open(log, "w")
        return subprocess.Popen([*cli, *args], stdout=handle, stderr=handle, env=env, start_new_session=True), log

    def both_started() -> bool:  # Tune makes a trial's folder as it starts it; its first report is steps away
        return len(list((search / "trials").glob("run_trial_*"))) == 2

    # 1. killed once both trials have started, before the first perturbation point
    first, log = start([str(path), "--run-dir", str(search)], "first")
    kill_driver_when(first, both_started, log)
    assert exploits_decided(search) == 0, "the kill came after the first exploit: nothing was tested before it"

    # 2. resumed: the search goes on to its first exploit, and is killed again right after it, the trials restarted
    # from their step-8 checkpoints and on their way to step 16
    second, log = start(["--resume", str(search)], "second")
    kill_driver_when(second, lambda: exploits_decided(search) >= 1, log)
    decided = (search / "trials" / "pbt_global.txt").read_text().splitlines()
    assert len(decided) == 1

    # 3. resumed again, as from a driver whose Ray went with it (an embedded one): Tune's staging folder of the
    # driver, in the Ray session's directory, is gone. It ends, and exploits once more at the second point.
    staging = Path(local_ray._private.worker._global_node.get_session_dir_path()) / "artifacts"
    for folder in staging.glob("*/trials/driver_artifacts"):
        shutil.rmtree(folder)
    third = subprocess.run([*cli, "--resume", str(search)], capture_output=True, text=True, env=env, timeout=600)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-4000:]
    # The exploit logged before the kill is kept (search.policy_logs_back), and the resumed search exploits again.
    # Where the kill lands against Tune's own saving of its state (every second here) decides whether the trials
    # resume past the first exploit or from just before it (then it is made again, or, when one trial already
    # stood at the next point, folded into the next one); the second point's exploit is made after the resume
    # either way.
    logged = (search / "trials" / "pbt_global.txt").read_text().splitlines()
    assert logged[: len(decided)] == decided and len(logged) > len(decided), logged
    exploits = [json.loads(line) for line in (search / "exploits.jsonl").read_text().splitlines()]
    # each exploit restored its donor's checkpoint at a perturbation point, one at the second point
    assert {e["donor_step"] for e in exploits} <= {interval, 2 * interval} and 2 * interval in {
        e["donor_step"] for e in exploits
    }, exploits
    assert all(e["restored_step"] == e["donor_step"] and e["donor"] != e["trial"] for e in exploits)
    rows = list(csv.DictReader(open(search / "trials.csv")))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}, rows
    assert {r["last_step"] for r in rows} == {str(last_step)}
    assert (search / "winner" / "model.safetensors").is_file()
    assert json.loads((search / "winner" / "test_metrics.json").read_text())["test_rows"] == 20
    assert len(reads_of_test_split(tmp_path / "runs" / "pbt-resume" / "data")) == 1  # tested once, at the end
