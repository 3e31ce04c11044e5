"""What `serve` and `bench serve` refuse, as a user meets it. A detached server measured by `bench serve` and `bench
soak`, then stopped by `serve stop`: test_run.py, on the server `raytune-ft run` leaves running (the same
background `raytune-ft serve` process that `serve --detach` starts)."""

from __future__ import annotations

import os

import pytest
from helpers import cli

pytestmark = pytest.mark.integration


def test_serve_refuses_what_it_cannot_serve(tmp_path):
    env = {**os.environ, "RAYTUNE_FT_STATE_DIR": str(tmp_path / "state")}
    done = cli("serve", str(tmp_path), env=env, timeout=120)
    assert done.returncode == 2 and "no raytune_ft.json" in done.stderr
    done = cli("serve", "stop", env=env, timeout=120)
    assert done.returncode == 0 and "no raytune-ft server was running" in done.stderr
    for args, message in (
        (["--concurrency", "0"], "--concurrency levels must be >= 1"),
        (["--concurrency", "a"], "--concurrency takes integers"),
        (["--api-key-env", "RAYTUNE_FT_UNSET_VAR"], "RAYTUNE_FT_UNSET_VAR is not set"),
    ):
        done = cli("bench", "serve", "http://127.0.0.1:9", *args, env=env, timeout=120)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    done = cli("bench", "serve", "http://127.0.0.1:9", env=env, timeout=120)
    assert done.returncode == 1 and "is `raytune-ft serve` running there?" in done.stderr
