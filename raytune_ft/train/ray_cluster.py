"""Which Ray a command runs on: the cluster at `cluster.address`, or an embedded local Ray started here."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from raytune_ft.config import ExperimentConfig


class ClusterError(RuntimeError):
    """The Ray cluster at the configured address could not be joined."""


def join_cluster(address: str, **init_args: Any) -> None:
    """`ray.init(address=ADDRESS)`, failing with one line that says why instead of Ray's traceback."""
    import ray

    try:
        ray.init(address=address, **init_args)
    except (ConnectionError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if "auth" in repr(exc.__cause__).lower() + str(exc).lower() or os.environ.get("RAY_AUTH_MODE") != "token":
            hint = (
                " If the cluster uses token authentication, set RAY_AUTH_MODE=token and give its token in"
                " RAY_AUTH_TOKEN or ~/.ray/auth_token."
            )
        raise ClusterError(f"cannot join the Ray cluster at {address}: {reason}.{hint}") from None


def ensure_ray(cfg: ExperimentConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    runtime_env: dict[str, Any] = {}
    if cfg.cluster.runtime_env.env_vars:
        runtime_env["env_vars"] = dict(cfg.cluster.runtime_env.env_vars)
    if cfg.cluster.runtime_env.pip:
        runtime_env["pip"] = list(cfg.cluster.runtime_env.pip)
    if cfg.cluster.runtime_env.working_dir:
        runtime_env["working_dir"] = cfg.cluster.runtime_env.working_dir
    if cfg.cluster.address is not None:
        join_cluster(cfg.cluster.address, runtime_env=runtime_env or None)
        return
    start_embedded_ray(runtime_env=runtime_env or None)


def start_embedded_ray(**init_args: Any) -> None:
    """`ray.init()` of a local Ray instance, with the settings below handed to its processes through the
    environment they inherit from the raylet rather than through a job runtime_env: a process with a runtime_env
    starts through Ray's setup_worker.py (Python and `import ray` twice) and cannot be one of the workers Ray
    starts ahead of time, which cost about a second for every actor (each Ray Train run starts five or more)."""
    import ray

    port, env = embedded_settings()
    with inherited_environment(env):
        ray.init(dashboard_port=port, **init_args)


def embedded_settings() -> tuple[int, dict[str, str]]:
    """The dashboard port of an embedded Ray (8265 when free, where people look for it) and the settings its
    processes get. A user's own value of any of these environment variables wins."""
    for port in (8265, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = probe.getsockname()[1]
            break
    env = {
        # Ray Train V2's placement-group cleaner finds the state API by looking for "the" local Ray; with two Ray
        # instances on one machine (two experiments at once, a test suite beside a benchmark) it fails with "Found
        # multiple active Ray instances" and a stopped trial's CPUs are never freed. Name this cluster's own.
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
        # Ray Train's controller polls its workers every 2 s by default: a run waits for a poll to see its workers
        # start, each checkpoint report registered and the run end. Workers on one machine answer a poll in
        # milliseconds. A 24-step run with 4 checkpoints, 2 workers of a tiny BERT: 39 s at 2 s, 36 s at 0.5 s,
        # and 12.0-12.4 s at 0.1 s against 13.5-15.1 s at 0.5 s (four runs each, alternated); 300 steps between
        # two polls' settings ran equally fast (24-26 s both), so the polling costs the steps nothing visible.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
        # One machine is never preempted; the watcher is an actor per run that polls every 5 s.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }
    return port, {key: os.environ.get(key, value) for key, value in env.items()}


@contextmanager
def inherited_environment(env: dict[str, str]) -> Iterator[None]:
    """ENV set while the block starts processes (they keep it), then this process's own environment as it was: Ray
    Train hands the RAY_TRAIN_* variables it finds set in the driver to its actors as a runtime_env."""
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def remove_leftover_placement_groups(log: Callable[[str], None] = print, *, any_job: bool = False) -> list[str]:
    """Remove the placement groups this driver's job (ANY_JOB: every job) still holds once its runs are over;
    their ids.

    Ray 2.60 can leave one behind when Tune stops a trial mid-run (a PBT pause or exploit, an early stop, the end
    of a search): the trial's Ray Train controller is killed with its owner, sees its workers die first and asks
    for a new group in the moment before its process exits, and the GCS keeps a group whose creator is already
    dead. An embedded Ray takes it along when it stops; a cluster joined with `cluster.address` kept its CPUs
    after the driver had exited (seen: 1 of the 2 CPUs of a long-lived test cluster, after a PBT search)."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    job = "" if any_job else ray.get_runtime_context().get_job_id()
    left = [pg for pg, info in placement_group_table().items() if pg.endswith(job) and info["state"] != "REMOVED"]
    for pg in left:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg))))
    if left:
        log(f"removed {len(left)} placement group(s) that Ray Train left behind (a stopped trial's): {left}")
    return left
