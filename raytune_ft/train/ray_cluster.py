"""Which Ray a command runs on: the cluster at `cluster.address`, or an embedded local Ray started here."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from raytune_ft.config import ExperimentConfig
from raytune_ft.config.schema import EMBEDDED_PLACEMENT_S
from raytune_ft.errors import RaytuneFtError

# Ray Train's own setting of how long a run's controller waits for its worker group to start
PLACEMENT_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


# what a command that joins a cluster by address needs when the cluster uses Ray's token authentication
TOKEN_HINT = "set RAY_AUTH_MODE=token and give its token in RAY_AUTH_TOKEN or ~/.ray/auth_token"


class ClusterError(RaytuneFtError, RuntimeError):
    """The Ray cluster at the configured address could not be joined."""


def join_cluster(address: str, **init_args: Any) -> None:
    """`ray.init(address=ADDRESS)`, failing with one line that says why instead of Ray's traceback."""
    import ray

    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    try:
        # a Ray on loopback (an embedded one, as `serve --detach` leaves it) is reached there: Ray's cluster mode
        # would swap 127.0.0.1 for the machine's network address, where that Ray does not listen
        with single_machine(host in ("127.0.0.1", "localhost", "::1")):
            if not address.startswith("ray://"):  # Ray Client gives up by itself after a few tries
                wait_for_gcs(address)
            ray.init(address=address, **init_args)
    except (ConnectionError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        unreachable = "nothing took a connection" in reason
        if not unreachable and (
            "auth" in repr(exc.__cause__).lower() + str(exc).lower() or os.environ.get("RAY_AUTH_MODE") != "token"
        ):
            hint = f" If the cluster uses token authentication, {TOKEN_HINT}."
        raise ClusterError(f"cannot join the Ray cluster at {address}: {reason}.{hint}") from None


JOIN_TIMEOUT_S = 60.0


def wait_for_gcs(address: str) -> None:
    """Wait until the GCS at ADDRESS ('auto': the one Ray last started on this machine) takes connections, up to
    JOIN_TIMEOUT_S (a head that is still starting). ray.init would wait for it forever: to a closed port it retried
    without end, printing a line every 5 s."""
    from ray._private.services import canonicalize_bootstrap_address

    target = canonicalize_bootstrap_address(address)  # ConnectionError when 'auto' finds no Ray
    if target is None:
        return
    host, port = target.rsplit(":", 1)
    timeout_s = JOIN_TIMEOUT_S
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ConnectionError(f"nothing took a connection at {target} for {timeout_s:g} s ({exc})") from None
            time.sleep(1.0)


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
    start_embedded_ray(placement_timeout_s=cfg.cluster.placement_deadline_s, runtime_env=runtime_env or None)


def start_embedded_ray(placement_timeout_s: float = EMBEDDED_PLACEMENT_S, **init_args: Any) -> None:
    """`ray.init()` of a local Ray instance, with the settings below handed to its processes through the
    environment they inherit from the raylet rather than through a job runtime_env: a process with a runtime_env
    starts through Ray's setup_worker.py (Python and `import ray` twice) and cannot be one of the workers Ray
    starts ahead of time, which cost about a second for every actor (each Ray Train run starts five or more).

    It listens on the loopback interface only: a local run has no reason to be reachable from the network (Ray
    2.60 on Linux listened on every interface: GCS, raylet, workers, dashboard agent). Ray's single-machine mode,
    its default on macOS and Windows (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), takes 127.0.0.1 as the node's address
    and binds there. Ray's processes read that setting from the environment, this one from Ray's constant while
    ray.init runs. The cluster token is still required."""
    import ray

    global _embedded_placement
    port, env = embedded_settings(placement_timeout_s)
    with single_machine(), inherited_environment(env):
        ray.init(dashboard_port=port, **init_args)
    _embedded_placement = env[PLACEMENT_TIMEOUT_ENV]


_embedded_placement: str | None = None  # the placement timeout this process's embedded Ray was started with


def placement_env(cfg: ExperimentConfig) -> dict[str, str]:
    """The environment a training run's controller is started with for cluster.placement_timeout_s (Ray Train
    reads its deadline there, and hands the driver's RAY_TRAIN_* variables to the controller): nothing when the
    Ray's processes already have that value (an embedded Ray started with it, here or by this process's raylet),
    since a controller started with an environment of its own cannot be a worker process Ray started ahead."""
    want = f"{cfg.cluster.placement_deadline_s:g}"
    have = os.environ.get(PLACEMENT_TIMEOUT_ENV) or _embedded_placement
    return {} if have == want else {PLACEMENT_TIMEOUT_ENV: want}


@contextmanager
def single_machine(on: bool = True) -> Iterator[None]:
    """Ray's single-machine mode in this process while the block runs (ray.init): its address is 127.0.0.1."""
    from ray._private import ray_constants

    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = cluster_mode and not on
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


def embedded_settings(placement_timeout_s: float = EMBEDDED_PLACEMENT_S) -> tuple[int, dict[str, str]]:
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
        # cluster.placement_timeout_s, read by each run's controller (ray_run.Trainer)
        PLACEMENT_TIMEOUT_ENV: f"{placement_timeout_s:g}",
        # Ray's single-machine mode: every port on 127.0.0.1 (start_embedded_ray)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
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


def resource_holders() -> list[str]:
    """What holds CPUs or GPUs in the Ray this process joined, one line each: placement groups (a training run's
    workers, another search's trials) and actors outside them (a Serve app's replicas). Empty when Ray's state
    API cannot say (no dashboard)."""
    from ray.util.state import list_actors, list_placement_groups

    def held(resources: dict[str, float]) -> str:
        return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU") and v)

    lines = []
    try:
        groups = list_placement_groups(filters=[("state", "=", "CREATED")], detail=True, raise_on_missing_output=False)
        actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False)
    except Exception:  # the state API is the dashboard's: absent or starting
        return []
    for group in groups:
        total: dict[str, float] = {}
        for bundle in group.bundles or []:
            for key, value in (bundle.get("unit_resources") or {}).items():
                total[key] = total.get(key, 0.0) + value
        if held(total):
            name = f" '{group.name}'" if group.name else ""
            lines.append(
                f"placement group {group.placement_group_id[:12]}{name} of job {group.creator_job_id}: {held(total)}"
            )
    for actor in actors:
        if actor.placement_group_id or not held(actor.required_resources or {}):
            continue
        name = f" '{actor.name}'" if actor.name else ""
        lines.append(
            f"actor {actor.class_name}{name} (pid {actor.pid}, job {actor.job_id}): {held(actor.required_resources)}"
        )
    return lines
