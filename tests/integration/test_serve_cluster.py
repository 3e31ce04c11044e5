"""Serving on a separate Ray cluster (`ray start --head`, as on a real head node): train there, deploy there with
`serve --address`, the app outlives the command, autoscales to two replicas under load, and `serve stop
--address` deletes it. Every step is the CLI a user runs, in its own process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_serve import free_port
from test_serve_cli import cli
from test_train import make_cfg, write_reviews

pytestmark = pytest.mark.integration


@pytest.fixture
def head_node():
    """A Ray head started by `ray start --head --block` in its own temp dir (so no other Ray finds it), stopped
    with SIGTERM, which shuts down this cluster's processes only. New clusters use token authentication: a
    driver that joins by address says so with RAY_AUTH_MODE=token."""
    ray_bin = Path(sys.executable).parent / "ray"
    tmp = tempfile.mkdtemp(prefix="rtc", dir="/tmp")  # short: Ray's socket paths live under it
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": tmp}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=3"]
        + ["--include-dashboard=false", "--disable-usage-stats", "--block"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    client_env = {**env, "RAY_AUTH_MODE": "token"}
    try:
        _wait_for_cluster(address, client_env, head)
        yield address, client_env
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_cluster(address: str, env: dict, head: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited"
        probe = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='{address}', logging_level='ERROR')"],
            env=env,
            capture_output=True,
            timeout=120,
        )
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"no Ray cluster answered at {address}")


def test_train_and_serve_on_a_cluster_that_scales_out_then_delete(tiny_bert, tmp_path, head_node):
    import yaml

    address, env = head_node
    env = {**env, "RAYTUNE_FT_STATE_DIR": str(tmp_path / "state")}
    data = write_reviews(tmp_path / "reviews.tsv", rows=60)
    cfg = make_cfg(
        tmp_path,
        "on-cluster",
        tiny_bert,
        data,
        train={"max_steps": 2, "eval_every_steps": 2},
        scaling={"num_workers": 1},
    )
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
    trained = cli("train", str(experiment), f"cluster.address={address}", env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]

    port = free_port()
    deployed = cli(
        "serve",
        str(tmp_path / "on-cluster"),
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

    # load from 8 clients at once: above one ongoing request per replica, Serve adds the second replica
    replicas: set[str] = set()
    errors: list[int] = []
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            status, headers = classify(url, "a film that is good")
            if status != 200:
                errors.append(status)
            else:
                replicas.add(headers["x-replica"])
            if len(replicas) >= 2:
                done.set()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    done.wait(timeout=180)
    done.set()
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
