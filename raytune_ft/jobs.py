"""Ray jobs: submit an experiment to a cluster through Ray's Job Submission API, then follow, inspect or stop it.

The experiment is validated here first (every error at once, before anything is uploaded), then submitted as
`raytune-ft train|tune FILE [KEY=VALUE ...] cluster.address=auto` with a runtime_env whose working_dir holds the
experiment file: `cluster.runtime_env.working_dir` when set, else the file's own directory. Paths in the file
resolve on the cluster, against that uploaded copy, and `${VAR:-default}` values from the cluster's environment
(`cluster.runtime_env.env_vars`), so a data path that exists only on this machine is named before submitting.
A relative `output_dir` would land in the job's throw-away copy of the working_dir, so the job writes to
`cluster.storage_path` (a directory every node mounts) when set, else to `~/raytune_ft/OUTPUT_DIR` on the head.
Token authentication (RAY_AUTH_MODE=token, with RAY_AUTH_TOKEN or ~/.ray/auth_token) is Ray's own: the token is
never put in the job.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from raytune_ft.config import ExperimentConfig
from raytune_ft.errors import RaytuneFtError

COMMANDS = ("train", "tune")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
EXPORT_LINE = re.compile(r"^export: (.+)$", re.MULTILINE)
# never uploaded with the working_dir: run outputs, virtualenvs, VCS and caches
EXCLUDES = ["runs/", ".venv/", ".git/", "__pycache__/", "*.pyc", "bench-results/"]


class JobError(RaytuneFtError, RuntimeError):
    """The cluster cannot be reached, or refused the request."""


@dataclass
class JobSpec:
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    entrypoint_num_cpus: float
    warnings: list[str]


def job_spec(
    experiment: Path, cfg: ExperimentConfig, command: str, overrides: list[str], submission_id: str | None = None
) -> JobSpec:
    """What `submit` sends: entrypoint, runtime_env, metadata (validated config CFG of file EXPERIMENT)."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}, got {command!r}")
    experiment = experiment.resolve()
    working_dir = _working_dir(experiment, cfg)
    relative = experiment.relative_to(working_dir)
    args = [str(PurePosixPath(*relative.parts)), *overrides, "cluster.address=auto"]
    out = cfg.cluster.storage_path or (cfg.output_dir if Path(cfg.output_dir).is_absolute() else None)
    if out is None:
        out = f"~/raytune_ft/{PurePosixPath(*Path(cfg.output_dir).parts)}"
    args.append(f"output_dir={out}")
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(EXCLUDES)}
    if cfg.cluster.runtime_env.pip:
        runtime_env["pip"] = list(cfg.cluster.runtime_env.pip)
    if cfg.cluster.runtime_env.env_vars:
        runtime_env["env_vars"] = dict(cfg.cluster.runtime_env.env_vars)
    metadata = {"raytune_ft.experiment": cfg.name, "raytune_ft.command": command, "raytune_ft.output_dir": out}
    if submission_id:
        metadata["raytune_ft.submission_id"] = submission_id
    return JobSpec(
        entrypoint=shlex.join(["raytune-ft", command, *args]),
        runtime_env=runtime_env,
        metadata=metadata,
        # the driver only orchestrates: its CPU stays free for the trials' workers
        entrypoint_num_cpus=0,
        warnings=_local_only_paths(cfg, working_dir),
    )


def _working_dir(experiment: Path, cfg: ExperimentConfig) -> Path:
    configured = cfg.cluster.runtime_env.working_dir
    if configured is None:
        return experiment.parent
    working_dir = Path(configured).expanduser()
    if not working_dir.is_absolute():
        working_dir = experiment.parent / working_dir
    working_dir = working_dir.resolve()
    if not working_dir.is_dir():
        raise ValueError(f"cluster.runtime_env.working_dir: {working_dir} is not a directory")
    if not experiment.is_relative_to(working_dir):
        raise ValueError(
            f"{experiment} is not inside cluster.runtime_env.working_dir ({working_dir}): the job runs the file "
            "from the uploaded working_dir"
        )
    return working_dir


def _local_only_paths(cfg: ExperimentConfig, working_dir: Path) -> list[str]:
    """Input paths that resolved on this machine outside the uploaded working_dir: the cluster must have them."""
    warnings = []
    for key, value in (("data.path", cfg.data.path), ("model.name_or_path", cfg.model.name_or_path)):
        path = Path(str(value))
        if path.is_absolute() and path.exists() and not path.is_relative_to(working_dir):
            warnings.append(
                f"{key} is {path} on this machine, outside the uploaded working_dir: the cluster's nodes must have it"
            )
    return warnings


def client(address: str | None) -> Any:
    """A JobSubmissionClient for the dashboard at ADDRESS (default: RAY_ADDRESS, as Ray's own CLI does)."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobError("no cluster: pass --address http://HEAD:8265 (the dashboard's address) or set RAY_ADDRESS")
    # Ray's client takes RAY_API_SERVER_ADDRESS (then RAY_ADDRESS) from the environment over the address it is
    # given: a user's --address would silently go to another cluster. The address named here wins.
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError or an HTTP error depending on the cause
        raise JobError(f"cannot reach the Ray dashboard at {address}: {_first_line(exc)}{_auth_hint(exc)}") from None
    finally:
        os.environ.update(hidden)


def submit(jobs: Any, spec: JobSpec, submission_id: str | None = None) -> str:
    try:
        return jobs.submit_job(
            entrypoint=spec.entrypoint,
            runtime_env=spec.runtime_env,
            metadata=spec.metadata,
            submission_id=submission_id,
            entrypoint_num_cpus=spec.entrypoint_num_cpus,
        )
    except Exception as exc:
        raise JobError(f"the cluster refused the job: {_first_line(exc)}{_auth_hint(exc)}") from None


def status(jobs: Any, job_id: str) -> dict[str, Any]:
    """Status, message, entrypoint, times and (once it ends) the export path the job printed."""
    try:
        info = jobs.get_job_info(job_id)
    except Exception as exc:
        raise JobError(f"no job {job_id}: {_first_line(exc)}") from None
    state = str(getattr(info.status, "value", info.status))
    result = {
        "job_id": job_id,
        "status": state,
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "metadata": info.metadata or {},
        "export": None,
    }
    if state == "SUCCEEDED":
        result["export"] = export_path(logs(jobs, job_id))
    return result


def logs(jobs: Any, job_id: str) -> str:
    try:
        return jobs.get_job_logs(job_id)
    except Exception as exc:
        raise JobError(f"no logs for job {job_id}: {_first_line(exc)}") from None


def follow(jobs: Any, job_id: str, write: Callable[[str], Any]) -> None:
    """Hand the job's log to WRITE as it is written, until the job ends."""
    import asyncio

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except Exception as exc:
        raise JobError(f"lost the log stream of job {job_id}: {_first_line(exc)}") from None


def stop(jobs: Any, job_id: str) -> bool:
    try:
        return bool(jobs.stop_job(job_id))
    except Exception as exc:
        raise JobError(f"cannot stop job {job_id}: {_first_line(exc)}") from None


def wait(jobs: Any, job_id: str, timeout_s: float, poll_s: float = 2.0, on_status: Callable | None = None) -> str:
    """Poll until the job ends; its final status (or the last one seen when TIMEOUT_S passes)."""
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        state = str(getattr(jobs.get_job_status(job_id), "value", ""))
        if on_status is not None:
            on_status(state)
        if state in TERMINAL:
            return state
        time.sleep(poll_s)
    return state


def export_path(log_text: str) -> str | None:
    """The export path a `train` or `tune` job printed last (`export: PATH`)."""
    found = EXPORT_LINE.findall(log_text)
    return found[-1].strip() if found else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _auth_hint(exc: BaseException) -> str:
    text = f"{exc}".lower()
    if ("401" in text or "unauthorized" in text or "auth" in text) and os.environ.get("RAY_AUTH_MODE") != "token":
        from raytune_ft.train.ray_cluster import TOKEN_HINT

        return f"; the cluster uses token authentication: {TOKEN_HINT}"
    return ""
