"""Serving on a separate Ray cluster (`ray start --head`, as on a real head node): train there, deploy there with
`serve --address`, the app outlives the command, autoscales to two replicas under load, and `serve stop
--address` deletes it. Every step is the CLI a user runs, in its own process."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from ray_head import alive_nodes, ray_head
from test_serve import free_port
from test_serve_cli import cli, train_tiny_classifier

pytestmark = pytest.mark.integration


@pytest.fixture
def head_node():
    port = free_port()
    address = f"127.0.0.1:{port}"
    args = ["--num-cpus=3", "--include-dashboard=false"]
    with ray_head(port, args, ready=lambda env: alive_nodes(address, env) is not None) as client_env:
        yield address, client_env


def test_train_and_serve_on_a_cluster_that_scales_out_then_delete(tiny_bert, tmp_path, head_node):
    address, env = head_node
    env = {**env, "RAYTUNE_FT_STATE_DIR": str(tmp_path / "state")}
    train_tiny_classifier(tmp_path, tiny_bert, "on-cluster", env, f"cluster.address={address}")

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


def test_run_with_address_searches_and_serves_on_the_cluster(tiny_bert, tmp_path, head_node):
    """`raytune-ft run --address`: the whole job against the cluster; the app it deploys outlives the command."""
    import yaml
    from test_run import SST2, experiment

    if not SST2.is_file():
        pytest.skip(f"the shared SST-2 data ({SST2}) is not beside this checkout")
    address, env = head_node
    env = {**env, "RAYTUNE_FT_STATE_DIR": str(tmp_path / "state")}
    port = free_port()
    exp = experiment(tmp_path, tiny_bert, port)
    raw = yaml.safe_load(exp.read_text())
    raw["bench"] = {"concurrency": [1], "requests": 20, "warmup_requests": 2}
    exp.write_text(yaml.safe_dump(raw))

    done = cli("run", str(exp), "--address", address, env=env, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    root = tmp_path / "runs" / "e2e"
    stages = json.loads((root / "run.json").read_text())["stages"]
    assert all(stage["state"] in ("done", "passed") for stage in stages.values()), stages
    assert not list((tmp_path / "state").glob("serve-*.json"))  # nothing local: the app is on the cluster
    status, _ = classify(f"http://127.0.0.1:{port}", "the good film")
    assert status == 200
    stopped = cli("serve", "stop", "--address", address, env=env)
    assert stopped.returncode == 0 and "deleted the Serve app" in stopped.stderr
