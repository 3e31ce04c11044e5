"""Experiments as Ray jobs on a real head node (`ray start --head` on loopback, non-default ports), driven only
through the CLI a user runs: submit a small tune job and follow it to SUCCEEDED and its export, a job that
fails on the cluster (FAILED, the error in its log), and a job stopped while it runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from ray_head import ray_head
from test_serve import free_port
from test_serve_cli import cli
from test_train import make_cfg, write_reviews

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def head_with_dashboard():
    """A head node with its dashboard (the Job Submission API lives there), found only by its address."""
    port, dashboard = free_port(), free_port()
    address = f"http://127.0.0.1:{dashboard}"
    args = ["--num-cpus=2", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1"]

    def ready(env: dict) -> bool:
        return cli("jobs", "list", "--address", address, env=env, timeout=60).returncode == 0

    with ray_head(port, args, ready) as client_env:
        yield address, client_env


def experiment(tmp_path: Path, tiny_bert: Path, name: str, max_steps: int = 4, **sections) -> Path:
    data = write_reviews(tmp_path / "reviews.tsv", rows=60)
    cfg = make_cfg(
        tmp_path / "runs",
        name,
        tiny_bert,
        data,
        train={"max_steps": max_steps, "eval_every_steps": 2, "checkpoint_every_steps": 2},
        scaling={"num_workers": 1},
        tune={"algorithm": "random", "num_samples": 1, "metric": "eval_loss", "mode": "min"},
    )
    raw = cfg.model_dump(mode="json", by_alias=True)
    raw["tune"]["search_space"] = {"train.lr": {"type": "choice", "values": [0.01]}}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    folder = tmp_path / "job"
    folder.mkdir()
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_tune_job_runs_to_its_export_and_is_listed(head_with_dashboard, tiny_bert, tmp_path):
    address, env = head_with_dashboard
    exp = experiment(tmp_path, tiny_bert, "job-ok")
    spec = cli("submit", str(exp), "--address", address, "--dry-run", env=env)
    assert spec.returncode == 0, spec.stderr[-2000:]
    sent = json.loads(spec.stdout)
    assert sent["entrypoint"].startswith("raytune-ft tune job-ok.yaml cluster.address=auto")
    assert sent["runtime_env"]["working_dir"] == str(exp.parent.resolve())
    submitted = cli("submit", str(exp), "--address", address, "--follow", env=env)
    assert submitted.returncode == 0, submitted.stderr[-3000:] + submitted.stdout[-3000:]
    job_id = submitted.stdout.strip().splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "winner:" in submitted.stdout and "SUCCEEDED" in submitted.stderr  # the followed log, then the end

    state = cli("jobs", "status", job_id, "--address", address, env=env)
    assert state.returncode == 0 and f"{job_id}: SUCCEEDED" in state.stdout, state.stdout + state.stderr
    [export] = [line.split("export: ", 1)[1] for line in state.stdout.splitlines() if line.startswith("export: ")]
    assert Path(export).is_relative_to(tmp_path / "runs")  # the experiment's output_dir, written on the head
    assert (Path(export) / "raytune_ft.json").is_file() and (Path(export) / "model.safetensors").is_file()
    logs = cli("jobs", "logs", job_id, "--address", address, env=env)
    assert logs.returncode == 0 and "test (read once)" in logs.stdout
    listed = cli("jobs", "list", "--address", address, env=env)
    assert job_id in listed.stdout and "job-ok" in listed.stdout


def test_a_job_that_fails_on_the_cluster_is_failed_with_its_error(head_with_dashboard, tiny_bert, tmp_path):
    address, env = head_with_dashboard
    # valid here; on the cluster the job's environment points the data at a file that does not exist
    exp = experiment(tmp_path, tiny_bert, "job-bad")
    raw = yaml.safe_load(exp.read_text())
    raw["data"]["path"] = "${REVIEWS:-" + raw["data"]["path"] + "}"
    raw["cluster"] = {"runtime_env": {"env_vars": {"REVIEWS": "/nonexistent/reviews.tsv"}}}
    exp.write_text(yaml.safe_dump(raw))
    submitted = cli("submit", str(exp), "--address", address, "--follow", env=env)
    assert submitted.returncode == 1, submitted.stderr[-3000:]
    job_id = submitted.stdout.strip().splitlines()[0]
    state = cli("jobs", "status", job_id, "--address", address, env=env)
    assert state.returncode == 1 and f"{job_id}: FAILED" in state.stdout
    logs = cli("jobs", "logs", job_id, "--address", address, env=env).stdout
    assert "/nonexistent/reviews.tsv" in logs


def test_a_running_job_is_stopped(head_with_dashboard, tiny_bert, tmp_path):
    address, env = head_with_dashboard
    exp = experiment(tmp_path, tiny_bert, "job-long", max_steps=400)
    submitted = cli("submit", str(exp), "--address", address, env=env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.strip().splitlines()[0]
    deadline = time.monotonic() + 120
    while "RUNNING" not in cli("jobs", "status", job_id, "--address", address, env=env).stdout:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(2)
    stopped = cli("jobs", "stop", job_id, "--address", address, env=env)
    assert stopped.returncode == 0 and "stop requested" in stopped.stderr
    deadline = time.monotonic() + 120
    while True:
        state = cli("jobs", "status", job_id, "--address", address, env=env)
        if f"{job_id}: STOPPED" in state.stdout:
            break
        assert time.monotonic() < deadline, state.stdout
        time.sleep(2)
    assert state.returncode == 1
