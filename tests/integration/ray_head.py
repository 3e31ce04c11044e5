"""A real Ray head for the tests that drive a cluster the way users do: `ray start --head --block` on loopback,
in its own short temp dir (so no other Ray finds it, and Ray's socket paths stay short), stopped with SIGTERM,
which shuts down this cluster's processes only. New clusters use token authentication, so the environment handed
to the test's commands says RAY_AUTH_MODE=token (the token is in ~/.ray)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def alive_nodes(address: str, env: dict) -> int | None:
    """How many nodes of the cluster at ADDRESS are alive (None while it cannot be joined)."""
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


@contextmanager
def ray_head(
    port: int, args: list[str], ready: Callable[[dict], bool], env: dict[str, str] | None = None
) -> Iterator[dict[str, str]]:
    """Start a head on PORT with ARGS; yield the client environment once READY(it) holds."""
    tmp = tempfile.mkdtemp(prefix="rth", dir="/tmp")
    bin_dir = str(Path(sys.executable).parent)
    # a job's driver runs `raytune-ft` from the head's PATH, as on a cluster whose image installed the project
    head_env = {**os.environ, "RAY_TMPDIR": tmp, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    head_env.update(env or {})
    head_env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [f"{bin_dir}/ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", *args]
        + ["--disable-usage-stats", "--block"],
        env=head_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client_env = {**head_env, "RAY_AUTH_MODE": "token"}
    try:
        deadline = time.monotonic() + 120
        while not ready(client_env):
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, f"the head on port {port} never came up"
            time.sleep(2)
        yield client_env
    finally:
        head.terminate()
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(tmp, ignore_errors=True)
