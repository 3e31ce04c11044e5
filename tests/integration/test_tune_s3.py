"""A search whose `tune.storage_path` is on S3, against a real S3-compatible server (conftest.s3_server): its
checkpoints go to the bucket, a driver killed mid-search resumes from there, PBT's exploit and the winner's export
read from there, and the credentials, which only the environment holds, are written nowhere."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import free_session_cpus
from helpers import cli, kill_session, make_cfg, pbt_pair, write_experiment, write_reviews

from raytune_ft.tune.runner import trial_id_of
from raytune_ft.tune.trial import EXPLOIT_KEY

pytestmark = pytest.mark.integration


def bucket_client(env: dict[str, str]):
    """The test's own client, told everything explicitly: this process does not have the environment the
    session's Ray and the CLI have."""
    from pyarrow.fs import S3FileSystem

    return S3FileSystem(
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=env["AWS_ENDPOINT_URL"],
        region=env["AWS_DEFAULT_REGION"],
        allow_bucket_creation=True,
    )


def listing(s3, prefix: str) -> list:
    from pyarrow.fs import FileSelector

    return s3.get_file_info(FileSelector(prefix, recursive=True, allow_not_found=True))


def folders(s3, prefix: str, start: str) -> set[str]:
    """Paths (relative to PREFIX) of the folders below it whose name starts with START."""
    from pyarrow.fs import FileType

    return {
        i.path.removeprefix(f"{prefix}/")
        for i in listing(s3, prefix)
        if i.type == FileType.Directory and i.base_name.startswith(start)
    }


def s3_reports(s3, trial_dir: str) -> list[dict]:
    with s3.open_input_stream(f"{trial_dir}/result.json") as fh:
        return [json.loads(line) for line in fh.read().decode().splitlines() if line.strip()]


def files_holding(secret: bytes, root: Path) -> tuple[list[Path], int]:
    """The files under ROOT that contain SECRET, and how many files were read."""
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return [p for p in files if secret in p.read_bytes()], len(files)


@pytest.mark.timeout(480)  # two searches in a row; the resume's own limit below ends a hang first
def test_pbt_search_on_s3_resumes_after_a_driver_kill_and_exports_the_winner(
    tiny_bert, tmp_path, session_ray_address, s3_server, local_ray
):
    s3 = bucket_client(s3_server)
    bucket = f"raytune-ft-{uuid.uuid4().hex[:8]}"
    s3.create_dir(bucket)
    storage = f"{bucket}/searches/pbt"
    data = write_reviews(tmp_path / "reviews.tsv", rows=200)
    # One exploit, at step 12 of 24: the trial at lr 1e-6 (the lower half) takes the other's checkpoint; after it,
    # reports at steps 16, 20 and 24 leave time to kill the driver in mid-search. MLflow's store is test_tune's.
    tune = pbt_pair(
        12, keep_checkpoints=1, perturbation_factors=[2.0, 2.0], mlflow=False, storage_path=f"s3://{storage}"
    )
    cfg = make_cfg(
        tmp_path / "runs",
        "s3",
        tiny_bert,
        data,
        # from the same seeded weights, at a constant 3e-3 the first trial's eval loss is clearly the lower at step 12
        train={
            "max_steps": 24,
            "eval_every_steps": 4,
            "checkpoint_every_steps": 4,
            "batch_size": 16,
            "epochs": 40,
            "lr_schedule": "constant",
            "warmup_ratio": 0,
        },
        scaling={"num_workers": 1, "cpus_per_worker": 1},
        tune=tune,
        cluster={"address": session_ray_address},
    )
    experiment = write_experiment(tmp_path / "s3.yaml", cfg)
    run = tmp_path / "search"
    # Tune saves (and uploads) its experiment state each second instead of every 10 s or more: the kill below lands
    # after the state has seen the exploit
    env = {**os.environ, **s3_server, "TUNE_GLOBAL_CHECKPOINT_S": "1"}

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "raytune_ft.cli", "tune", str(experiment), "--run-dir", str(run)],
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,  # its own process group: the kill takes the driver, not the session's Ray
        )
    try:
        # Past the exploit: the trial at lr 1e-6 (the grid's second: trial id ..._00001) has restarted from the
        # donor's checkpoint, and its new Ray Train run has begun writing a checkpoint to the bucket. The kill goes
        # by what the trials write, not by what the driver has taken in: the driver lags behind them by seconds.
        deadline = time.monotonic() + 180
        restarted = set()
        while time.monotonic() < deadline and first.poll() is None and not restarted:
            written = folders(s3, f"{storage}/train-runs", "step_")
            restarted = {c.split("/")[0] for c in written if c.split("/")[0].endswith("_00001") and "/run-1/" in c}
            time.sleep(0.2)
        assert restarted, (tmp_path / "first.log").read_text()[-4000:]
    finally:
        if first.poll() is None:
            kill_session(first)
    killed_at = time.time()
    assert first.returncode == -9, (tmp_path / "first.log").read_text()[-4000:]  # killed, not finished
    [exploiter] = restarted
    runs_before = folders(s3, f"{storage}/train-runs", "run-")
    free_session_cpus()  # the dead driver's trials and Ray Train runs go with it, asynchronously

    resumed = cli("tune", "--resume", str(run), env=env, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    rows = list(csv.DictReader(open(run / "trials.csv")))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    assert {r["last_step"] for r in rows} == {"24"}

    # Every checkpoint is in the bucket, none on local disk: Ray Train's (each trial's runs) and Tune's
    train_checkpoints = folders(s3, f"{storage}/train-runs", "step_")
    assert {p.split("/")[0] for p in train_checkpoints} == {r["trial_id"] for r in rows}
    assert folders(s3, f"{storage}/trials", "checkpoint_")
    assert not (run / "trials").exists() and not (run / "train-runs").exists()
    assert not list(tmp_path.rglob("step_0*")) and not list(tmp_path.rglob("checkpoint_0*"))

    # The resume went on from the bucket: new Ray Train runs that wrote their checkpoints there, and each trial
    # that trained after the kill restarted from its checkpoint there, past the exploit (the record a restarted
    # trial attaches to its first report says what it restored)
    new_runs = folders(s3, f"{storage}/train-runs", "run-") - runs_before
    assert new_runs and all(any(c.startswith(f"{r}/") for c in train_checkpoints) for r in new_runs), new_runs
    reports, restarts = {}, []
    for trial_dir in folders(s3, f"{storage}/trials", "run_trial_"):
        reports[trial_dir] = s3_reports(s3, f"{storage}/trials/{trial_dir}")
        assert reports[trial_dir][-1]["step"] == 24
        restarts += [r for r in reports[trial_dir] if r["reported_at"] > killed_at][:1]
    assert restarts
    for first_report in restarts:
        restored = first_report[EXPLOIT_KEY]
        assert restored["donor_checkpoint"].startswith(f"{storage}/trials/run_trial_"), restored
        assert first_report["resumed_step"] == restored["donor_step"] >= 12

    # PBT's exploit: the trial at lr 1e-6 restored the donor's checkpoint from the bucket, at the perturbation
    # step (logged by the first driver, or by the resumed one when the kill came before the first driver heard
    # of it: the resumed trial restores the donor's checkpoint again)
    exploits = [json.loads(line) for line in (run / "exploits.jsonl").read_text().splitlines()]
    [donor] = {r["trial_id"] for r in rows} - {exploiter}
    assert exploits
    for exploit in exploits:
        assert (exploit["trial"], exploit["donor"]) == (exploiter, donor), exploit
        assert exploit["donor_step"] == exploit["restored_step"] == 12 and exploit["bytes_moved"] > 0
        assert exploit["new_config"] == {"train.lr": pytest.approx(6e-3)}  # the donor's 3e-3, doubled
        assert exploit["donor_checkpoint"].startswith(f"{storage}/trials/run_trial_{donor}_"), exploit
    [exploiter_dir] = [t for t in reports if trial_id_of(t) == exploiter]
    records = [r[EXPLOIT_KEY] for r in reports[exploiter_dir] if r.get(EXPLOIT_KEY, {}).get("exploit")]
    assert records and all(r["donor_checkpoint"].startswith(f"{storage}/trials/run_trial_{donor}_") for r in records)

    # The winner was exported from its checkpoint in the bucket, and tested
    printed = "".join(resumed.stderr.split())  # the console wraps long lines, paths included
    assert f"exporting{storage}/trials/run_trial_" in printed
    assert (run / "winner" / "model.safetensors").is_file()
    assert json.loads((run / "winner" / "test_metrics.json").read_text())["test_rows"] > 0

    # The secret key was written nowhere: not in the test's files (experiment, run directory, the first driver's
    # output), not in the bucket, not in the session's Ray's directory (logs, Tune's driver staging), not in
    # what the resumed driver printed
    secret = s3_server["AWS_SECRET_ACCESS_KEY"].encode()
    assert files_holding(secret, tmp_path)[0] == []
    objects = [i.path for i in listing(s3, bucket) if i.size is not None]
    assert len(objects) > 20
    for path in objects:
        with s3.open_input_stream(path) as fh:
            assert secret not in fh.read(), path
    session_dir = Path(local_ray._private.worker._global_node.get_session_dir_path())
    assert (session_dir / "logs").is_dir()
    leaked, read = files_holding(secret, session_dir)
    assert leaked == [] and read > 10
    assert secret.decode() not in resumed.stdout + resumed.stderr
