"""Start and stop the Serve application.

Locally, `serve` runs an embedded Ray and stays in the foreground until Ctrl-C; `serve --detach` starts that same
foreground process in the background (its own session, log file beside its state file) and returns once the app
answers /healthz; `serve stop` interrupts it, which shuts Serve and the embedded Ray down. On a cluster
(`cluster.address`) the app is deployed there and outlives the command, as Ray Serve apps do; `serve stop
--address` deletes it. Each local server leaves a state file (pid, URL, Ray address) that `serve stop` and
`bench serve --baseline-noop` read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raytune_ft.config import ExperimentConfig
from raytune_ft.errors import RaytuneFtError
from raytune_ft.serve.app import APP_NAME, build_app


def state_dir() -> Path:
    return Path(os.environ.get("RAYTUNE_FT_STATE_DIR") or Path(tempfile.gettempdir()) / "raytune_ft")


class ServeError(RaytuneFtError, RuntimeError):
    pass


def api_key_of(cfg: ExperimentConfig) -> str | None:
    return api_key_in(cfg.serve.api_key_env, "serve.api_key_env")


def api_key_in(name: str | None, asked_by: str) -> str | None:
    """The API key in the environment variable NAME (None when no variable is named); ServeError naming ASKED_BY
    (the setting or option that named it) when it is not set."""
    if not name:
        return None
    key = os.environ.get(name, "").strip()
    if not key:
        raise ServeError(f"{asked_by}: {name} is not set (or empty) in this environment")
    return key


def app_from_args(args: dict[str, Any]) -> Any:
    """Ray Serve application builder, for `serve run` / `serve deploy` / KubeRay's RayService (`import_path:
    raytune_ft.serve.deploy:app_from_args`): args `export` (an export or a run directory holding one; or a list of
    LoRA exports, or folders of them, served as adapters of one base) and optionally `overrides`
    (["serve.KEY=VALUE", ...]), validated like `raytune-ft serve`'s."""
    if "export" not in args:
        raise ServeError("app_from_args needs args.export: the export directory (or a run directory holding one)")
    exports = [Path(p) for p in (args["export"] if isinstance(args["export"], list) else [args["export"]])]
    cfg = serving_config(exports, args.get("overrides") or [])
    return build_app(exports, cfg.serve, api_key_of(cfg))


def serving_config(exports: list[Path], overrides: list[str]) -> ExperimentConfig:
    """The settings of a deployment of EXPORTS: the first export's experiment (several adapters: the first of them,
    in the order given, folders expanded), with OVERRIDES; ConfigError when they do not validate."""
    from raytune_ft.serve.model import ExportError, export_config, find_export

    try:
        first = find_export(exports[0])
    except ExportError:
        from raytune_ft.serve.adapters import adapter_exports

        first = adapter_exports(exports)[0].path
    return export_config(first, overrides)


def url_of(cfg: ExperimentConfig) -> str:
    host = cfg.serve.host
    if host in ("0.0.0.0", "::"):
        address = cfg.cluster.address or ""
        host = address.split("://")[-1].split(":")[0] if address not in ("", "auto") else "127.0.0.1"
    return f"http://{host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"


def state_file(port: int) -> Path:
    return state_dir() / f"serve-{port}.json"


def local_servers() -> list[dict[str, Any]]:
    """The local `raytune-ft serve` processes still alive, from their state files (stale files are removed)."""
    servers = []
    for path in sorted(state_dir().glob("serve-*.json")):
        try:
            state = json.loads(path.read_text())
            os.kill(int(state["pid"]), 0)
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)
            continue
        servers.append({**state, "state_file": str(path)})
    return servers


def deploy(export: Path | list[Path], cfg: ExperimentConfig, log: Callable[[str], None] = print) -> str:
    """Deploy EXPORT (one export, or several LoRA exports of one base: build_app) on the configured cluster, or on
    an embedded Ray; the URL once every replica is healthy."""
    import ray
    from ray import serve

    from raytune_ft.train.ray_cluster import ensure_ray

    others = [s for s in local_servers() if s["port"] == cfg.serve.port and s["pid"] != os.getpid()]
    if cfg.cluster.address is None and others:
        raise ServeError(f"a raytune-ft server already listens on port {cfg.serve.port}; `raytune-ft serve stop`")
    app = build_app(export, cfg.serve, api_key_of(cfg))
    ensure_ray(cfg)  # ClusterError when cluster.address cannot be joined
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    refuse_other_proxy(cfg)
    serve.run_many(
        [serve.RunTarget(target=app, name=APP_NAME, route_prefix=cfg.serve.route_prefix)],
        wait_for_applications_running=False,  # serve.run would wait for it without end: wait_until_running
    )
    asks = {"CPU": cfg.serve.num_cpus, "GPU": cfg.serve.num_gpus}
    wait_until_running(APP_NAME, asks, cfg.cluster.placement_deadline_s, embedded=cfg.cluster.address is None)
    url = url_of(cfg)
    if cfg.cluster.address is None:
        state_dir().mkdir(parents=True, exist_ok=True)
        state = {
            "pid": os.getpid(),
            "url": url,
            "port": cfg.serve.port,
            "ray_address": ray.get_runtime_context().gcs_address,
            # a new local Ray turns token authentication on; a driver joining by address must ask for it
            "ray_auth_mode": os.environ.get("RAY_AUTH_MODE"),
            "export": [str(p) for p in export] if isinstance(export, list) else str(export),
        }
        state_file(cfg.serve.port).write_text(json.dumps(state))
    return url


START_TIMEOUT_S = 600.0  # replicas placed, loading their model: as long as `serve --detach` waits for /healthz


def wait_until_running(name: str, asks: dict[str, float], placement_s: float, embedded: bool) -> None:
    """Wait until the Serve app NAME, whose replicas each ask for ASKS, runs. Replicas that cannot be placed fail
    it after PLACEMENT_S (cluster.placement_timeout_s; at once when an EMBEDDED Ray has fewer CPUs or GPUs in all
    than one replica asks for), replicas that do not start after START_TIMEOUT_S, each with what Serve says and
    what holds the resources; the app is deleted then. serve.run waits for the app without end: behind a training
    run that held the CPUs it waited for good."""
    import ray
    from ray import serve

    from raytune_ft.train.ray_cluster import resource_holders

    total = ray.cluster_resources()
    never = embedded and any(total.get(k, 0) < v for k, v in asks.items() if v)
    start = time.monotonic()
    while not never:
        app = serve.status().applications.get(name)
        status = getattr(app, "status", None)
        if status == "RUNNING":
            return
        deployments = app.deployments if app else {}
        messages = [f"{deployment}: {d.message}" for deployment, d in deployments.items() if d.message]
        if status == "DEPLOY_FAILED":
            serve.delete(name)
            raise ServeError(f"the app failed to deploy: {app.message or '; '.join(messages)}")
        unplaced = any("to be scheduled" in m for m in messages)
        limit = placement_s if unplaced else START_TIMEOUT_S
        if time.monotonic() - start > limit:
            break
        time.sleep(0.5)
    serve.delete(name)
    replicas = f"replicas of {', '.join(f'{v:g} {k}' for k, v in asks.items() if v)} each"
    if never:
        why = f"can never be placed: the embedded Ray has {', '.join(f'{total.get(k, 0):g} {k}' for k in asks)}"
    else:
        why = f"did not start within {limit:g} s" + (" (cluster.placement_timeout_s)" if unplaced else "")
        why += "; " + "; ".join(messages) if messages else ""
    holders = resource_holders()
    raise ServeError(
        f"the app's {replicas} {why}."
        + (f" Held by: {'; '.join(holders)}." if holders else "")
        + " Lower serve.num_cpus/num_gpus or serve.autoscaling.min_replicas, or free the resources."
    )


def refuse_other_proxy(cfg: ExperimentConfig) -> None:
    """Serve's proxy keeps the host and port it started with for the cluster's lifetime, and serve.start only logs
    that it ignored new ones: the app would answer somewhere other than the URL given to the user."""
    from ray.serve.context import _get_global_client

    running = _get_global_client().http_config
    if (running.host, running.port) != (cfg.serve.host, cfg.serve.port):
        raise ServeError(
            f"Serve already runs on this cluster with its HTTP proxy on {running.host}:{running.port}; "
            f"serve.host/serve.port ask for {cfg.serve.host}:{cfg.serve.port}: set serve.port={running.port} "
            f"(and serve.host={running.host}), or shut Serve down there first (`serve shutdown` with Ray's CLI)"
        )


def serve_until_interrupted(port: int, log: Callable[[str], None]) -> None:
    from ray import serve

    stopping = False

    def interrupted(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, interrupted)
    # A process started in the background by a non-interactive shell (`... &` in a script) inherits SIGINT
    # ignored, and Python then leaves it ignored: `serve stop`'s SIGINT would do nothing.
    signal.signal(signal.SIGINT, interrupted)
    try:
        while not stopping:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    log("stopping")
    try:
        serve.shutdown()
    finally:
        state_file(port).unlink(missing_ok=True)


def start_detached(
    export: Path | list[Path],
    cfg: ExperimentConfig,
    overrides: list[str],
    timeout_s: float = 600.0,
    log: Callable = print,
) -> str:
    """Run `raytune-ft serve EXPORT...` in the background and wait until it answers /healthz."""
    if cfg.cluster.address is not None:
        return deploy(export, cfg, log)  # a cluster keeps the app; nothing local has to stay up
    api_key_of(cfg)  # fail here, not in the background process
    state_dir().mkdir(parents=True, exist_ok=True)
    log_path = state_dir() / f"serve-{cfg.serve.port}.log"
    paths = export if isinstance(export, list) else [export]
    cmd = [sys.executable, "-m", "raytune_ft.cli", "serve", *(str(p) for p in paths), *overrides]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    url = url_of(cfg)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text()[-3000:]
            raise ServeError(f"the background server exited ({process.returncode}); {log_path}:\n{tail}")
        if state_file(cfg.serve.port).exists() and _healthy(url):
            log(f"server pid {process.pid}, log {log_path}")
            return url
        time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    raise ServeError(f"the background server did not answer {url}/healthz within {timeout_s:.0f} s; see {log_path}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def stop(address: str | None, log: Callable[[str], None] = print, timeout_s: float = 60.0) -> int:
    """Stop the local servers (or delete the app from the cluster at ADDRESS); how many were stopped."""
    if address is not None:
        import ray
        from ray import serve

        from raytune_ft.train.ray_cluster import ClusterError, join_cluster

        try:
            if not ray.is_initialized():  # `run --address --stop-server` has joined it already
                join_cluster(address, logging_level="ERROR")
        except ClusterError as exc:
            raise ServeError(str(exc)) from None
        if APP_NAME not in serve.status().applications:
            return 0
        serve.delete(APP_NAME)
        log(f"deleted the Serve app '{APP_NAME}' from {address}")
        return 1
    stopped = 0
    for server in local_servers():
        pid = int(server["pid"])
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.5)
        for last_resort in (signal.SIGTERM, signal.SIGKILL):
            if not _alive(pid):
                break
            os.kill(pid, last_resort)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.5)
        # returns only once the server is gone: a server started next must not meet this one still on the port
        Path(server["state_file"]).unlink(missing_ok=True)
        log(f"stopped the server at {server['url']} (pid {pid})")
        stopped += 1
    return stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # a stopped child of this process stays a zombie until reaped; it counts as gone
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True
