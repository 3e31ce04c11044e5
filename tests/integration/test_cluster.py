"""Experiments on a real head node (`ray start --head` on loopback, non-default ports, its dashboard), driven only
through the CLI a user runs, every step in its own process:
- Ray jobs: a small tune job followed to SUCCEEDED and its export, a job that fails on the cluster (FAILED, the
  error in its log), a job stopped while it runs, an unknown job id and an unreachable cluster refused;
- `run --address --stop-server` for the whole job of an experiment without a search (trained, tested, served and
  benchmarked there, the app deleted), then its export deployed there with `serve --address` (the app outlives the
  command, autoscales to two replicas under load, `serve stop --address` deletes it)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import cli, free_port, make_cfg, write_reviews
from ray_head import ray_head

from raytune_ft.data import reads_of_test_split

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def head():
    """A head node with 3 CPUs and its dashboard (the Job Submission API lives there): (GCS address, dashboard
    address, client environment)."""
    port, dashboard = free_port(), free_port()
    address = f"http://127.0.0.1:{dashboard}"
    args = ["--num-cpus=3", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1"]

    def ready(env: dict) -> bool:
        return cli("jobs", "list", "--address", address, env=env, timeout=60).returncode == 0

    with ray_head(port, args, ready) as client_env:
        yield f"127.0.0.1:{port}", address, client_env, free_port()


@pytest.fixture
def head_serve_port(head):
    """Serve's proxy port on the head: the first deployment fixes it for the cluster's lifetime."""
    return head[3]


@pytest.fixture
def head_with_dashboard(head):
    return head[1], head[2]


@pytest.fixture
def head_node(head):
    return head[0], head[2]


def job_experiment(tmp_path: Path, tiny_bert: Path, name: str, max_steps: int = 4, **sections) -> Path:
    data = write_reviews(tmp_path / "reviews.tsv", rows=60)
    cfg = make_cfg(
        tmp_path / "runs",
        name,
        tiny_bert,
        data,
        train={"max_steps": max_steps, "eval_every_steps": 2, "checkpoint_every_steps": 2},
        scaling={"num_workers": 1},
        # MLflow's store (its import and a new SQLite schema: 5 s of CPU) is test_tune.py's to check
        tune={"algorithm": "random", "num_samples": 1, "metric": "eval_loss", "mode": "min", "mlflow": False},
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
    exp = job_experiment(tmp_path, tiny_bert, "job-ok")
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
    exp = job_experiment(tmp_path, tiny_bert, "job-bad")
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


def test_an_unknown_job_and_an_unreachable_cluster_are_refused(head_with_dashboard, tmp_path):
    address, env = head_with_dashboard
    unknown = cli("jobs", "status", "raysubmit_nosuchjob", "--address", address, env=env)
    assert unknown.returncode == 1 and "no job raysubmit_nosuchjob" in unknown.stderr, unknown.stderr[-2000:]
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    unreachable = cli("jobs", "list", "--address", nowhere, env=env)
    assert unreachable.returncode == 1 and f"cannot reach the Ray dashboard at {nowhere}" in unreachable.stderr


def test_a_running_job_is_stopped(head_with_dashboard, tiny_bert, tmp_path):
    address, env = head_with_dashboard
    exp = job_experiment(tmp_path, tiny_bert, "job-long", max_steps=400)
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


def classify(url: str, text: str) -> tuple[int, dict]:
    body = json.dumps({"text": text}).encode()
    req = urllib.request.Request(f"{url}/v1/classify", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            response.read()
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)
    except OSError:
        return 0, {}


def test_run_with_address_trains_once_and_serves_then_the_export_scales_out_on_the_cluster(
    tiny_bert, tmp_path, head_node, head_serve_port
):
    """`raytune-ft run --address --stop-server` of an experiment without a search: one training run, tested once,
    served from the cluster and benchmarked there, then the cluster's app deleted. Then its export deployed there
    with `serve --address`: the app outlives the command, autoscales to two replicas under load, and `serve stop
    --address` deletes it. (The search path of `run` is test_run.py's, on an embedded Ray; searches on a cluster
    are the tune jobs above and test_autoscaling.py.)"""
    from test_run import experiment

    address, env = head_node
    env = {**env, "RAYTUNE_FT_STATE_DIR": str(tmp_path / "state")}
    port = head_serve_port
    exp = experiment(tmp_path, tiny_bert, port)
    raw = yaml.safe_load(exp.read_text())
    del raw["tune"]
    raw["train"]["lr"] = 1e-2
    raw["bench"] = {"concurrency": [1], "requests": 20, "warmup_requests": 2}
    exp.write_text(yaml.safe_dump(raw))
    root = tmp_path / "runs" / "e2e"

    done = cli("run", str(exp), "--address", address, "--stop-server", env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # the worker's line after each evaluation reaches the user (one epoch of 240 rows in batches of 16 is 15 steps,
    # under max_steps)
    assert "step 8/15 | train_loss" in done.stdout + done.stderr
    state = json.loads((root / "run.json").read_text())
    assert all(stage["state"] in ("done", "passed") for stage in state["stages"].values()), state["stages"]
    tested = json.loads((root / "export" / "test_metrics.json").read_text())
    assert tested["test_rows"] > 0 and len(reads_of_test_split(root / "data")) == 1
    summary = state["summary"]
    assert summary["test"]["test_accuracy"] == tested["test_accuracy"] and summary["hyperparameters"] == {}
    assert json.loads((root / "serve.json").read_text())["check"]["agree"] == 32
    assert "Serving" in (root / "report.html").read_text()
    assert not list((tmp_path / "state").glob("serve-*.json"))  # nothing local: the app was on the cluster
    assert f"deleted the Serve app 'raytune_ft' from {address}" in done.stdout + done.stderr  # --stop-server
    status, _ = classify(f"http://127.0.0.1:{port}", "the good film")
    assert status != 200

    # the export the run trained, deployed on the cluster by `serve --address` (the proxy keeps the run's port)
    deployed = cli(
        "serve",
        str(root),
        "--address",
        address,
        f"serve.port={port}",
        "serve.autoscaling.min_replicas=1",
        "serve.autoscaling.max_replicas=2",
        "serve.autoscaling.target_ongoing_requests=1",
        "serve.autoscaling.upscale_delay_s=1",
        env=env,
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    url = deployed.stdout.strip().splitlines()[-1]
    assert url == f"http://127.0.0.1:{port}" and "serve stop --address" in deployed.stderr
    # the command has exited; the app lives on the cluster
    assert not list((tmp_path / "state").glob("serve-*.json"))
    status, _ = classify(url, "the good film")
    assert status == 200
    # the proxy cannot move while Serve runs there: another port is refused, naming the field, the app untouched
    elsewhere = cli("serve", str(root), "--address", address, f"serve.port={free_port()}", env=env)
    assert elsewhere.returncode == 2 and f"serve.port={port}" in elsewhere.stderr, elsewhere.stderr[-2000:]
    assert classify(url, "the good film")[0] == 200

    # load from 8 clients at once: above one ongoing request per replica, Serve adds the second replica
    replicas: set[str] = set()
    errors: list[int] = []
    enough = threading.Event()

    def client() -> None:
        while not enough.is_set():
            status, headers = classify(url, "a film that is good")
            if status != 200:
                errors.append(status)
            else:
                replicas.add(headers["x-replica"])
            if len(replicas) >= 2:
                enough.set()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    enough.wait(timeout=180)
    enough.set()
    for t in threads:
        t.join()
    assert len(replicas) == 2, f"still one replica after 180 s of load: {replicas}"
    assert errors == []

    stopped = cli("serve", "stop", "--address", address, env=env)
    assert stopped.returncode == 0 and "deleted the Serve app" in stopped.stderr, stopped.stderr[-2000:]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and classify(url, "gone?")[0] == 200:
        time.sleep(1)
    assert classify(url, "gone?")[0] != 200
