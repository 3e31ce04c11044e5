"""A real Ray head for the tests that drive a cluster the way users do: `ray start --head --block` on loopback,
in its own short temp dir (so no other Ray finds it, and Ray's socket paths stay short) and its own process group,
which is killed whole at the end. New clusters use token authentication, so the environment handed to the test's
commands says RAY_AUTH_MODE=token (the token is in ~/.ray)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import free_port

COUNT_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
while True:
    print(sum(1 for node in ray.nodes() if node["Alive"]), flush=True)
    time.sleep(float(sys.argv[2]))
"""


def alive_nodes(address: str, env: dict) -> int | None:
    """How many nodes of the cluster at ADDRESS are alive (None while it cannot be joined): one client process."""
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = probe.stdout.strip().splitlines()
    return int(lines[-1]) if probe.returncode == 0 and lines and lines[-1].isdigit() else None


class NodeCounts:
    """The alive-node count of a cluster every INTERVAL seconds, from one long-lived client: a new Python process
    per look costs about two seconds of CPU, which the cluster under test needs."""

    def __init__(self, address: str, env: dict, interval: float = 1.0) -> None:
        self.seen: list[int] = []
        self._process = subprocess.Popen(
            [sys.executable, "-c", COUNT_NODES, address, str(interval)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            if line.strip().isdigit():
                self.seen.append(int(line))

    def wait_for(self, count: int, timeout_s: float) -> int | None:
        """Wait until the latest count is COUNT; the latest count either way."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (not self.seen or self.seen[-1] != count):
            assert self._process.poll() is None, "the node-count client exited"
            time.sleep(0.5)
        return self.seen[-1] if self.seen else None

    def close(self) -> None:
        self._process.kill()
        self._process.wait(timeout=30)


def train_poll() -> dict[str, str]:
    """The Ray Train poll interval `raytune-ft` gives an embedded Ray, for a test's own cluster."""
    from raytune_ft.train.ray_cluster import embedded_settings

    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    return {key: embedded_settings()[1][key]}


@contextmanager
def ray_head(
    port: int, args: list[str], ready: Callable[[dict], bool], env: dict[str, str] | None = None
) -> Iterator[dict[str, str]]:
    """Start a head on PORT with ARGS; yield the client environment once READY(it) holds."""
    tmp = tempfile.mkdtemp(prefix="rth", dir="/tmp")
    bin_dir = str(Path(sys.executable).parent)
    dashboard = next((a.split("=", 1)[1] for a in args if a.startswith("--dashboard-port=")), None)
    if dashboard is None and "--include-dashboard=false" not in args:
        dashboard = str(free_port())
        args = [*args, f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1"]
    # The agent's fixed default ports are taken by any other Ray on this machine (the pytest session's): without
    # its agent the head refuses every job ("No available agent to submit job").
    for option in (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
        "--ray-client-server-port",
    ):
        if not any(a.startswith(f"{option}=") for a in args):
            args = [*args, f"{option}={free_port()}"]
    # a job's driver runs `raytune-ft` from the head's PATH, as on a cluster whose image installed the project
    head_env = {**os.environ, "RAY_TMPDIR": tmp, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    # Ray Train's poll as `raytune-ft` sets it on an embedded Ray (0.1 s; Ray's default: 2 s), so that a run on
    # this head does not wait seconds to see each checkpoint
    head_env.update(train_poll())
    head_env.update(env or {})
    head_env.pop("RAY_ADDRESS", None)
    own = dict(head_env)  # what the head's processes inherit; clients get head_env
    if dashboard is not None:
        # The pytest session's own Ray runs beside this head: Ray Train's placement-group cleaner must find this
        # cluster's state API, not look for "the" local Ray and find two.
        own["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    head = subprocess.Popen(
        [f"{bin_dir}/ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", *args]
        + ["--disable-usage-stats", "--block"],
        env=own,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    client_env = {**head_env, "RAY_AUTH_MODE": "token"}
    try:
        deadline = time.monotonic() + 120
        while not ready(client_env):
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, f"the head on port {port} never came up"
            time.sleep(0.5)
        yield client_env
    finally:
        # `ray start --block` takes about 30 s to stop on SIGTERM; every process of this cluster (GCS, raylets,
        # dashboard, workers, fake nodes) is in the head's process group, and nothing of it needs to be kept
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
