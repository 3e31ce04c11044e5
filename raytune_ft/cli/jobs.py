"""`raytune-ft submit` and `raytune-ft jobs status|logs|stop|list`: experiments as Ray jobs on a cluster."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from raytune_ft.cli.common import (
    EXIT_CONFIG,
    EXIT_RUNTIME,
    ConfigArg,
    OverridesArg,
    app,
    err,
    fail,
    load_experiment,
    out,
)

AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="The cluster's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)."),
]
JobIdArg = Annotated[str, typer.Argument(help="Job id printed by `raytune-ft submit`.", show_default=False)]

jobs_app = typer.Typer(help="Follow, inspect and stop submitted jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@app.command()
def submit(
    config: ConfigArg,
    overrides: OverridesArg = None,
    address: AddressOpt = None,
    command: Annotated[str, typer.Option("--command", help="What the job runs: tune or train.")] = "tune",
    submission_id: Annotated[str | None, typer.Option("--submission-id", help="Job id to use (unique).")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the job's log until it ends.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the job spec (JSON) and submit nothing.")] = False,
) -> None:
    """Submit an experiment to a Ray cluster as a Ray job; print its id (and with --follow, its log)."""
    from raytune_ft.jobs import COMMANDS, JobError, client, job_spec
    from raytune_ft.jobs import submit as submit_job

    if command not in COMMANDS:
        fail(f"--command must be one of {', '.join(COMMANDS)}, got {command!r}", EXIT_CONFIG)
    cfg = load_experiment(config, overrides, runs_here=False)
    if command == "tune" and cfg.tune is None:
        fail(f"{config}: the experiment has no 'tune' section; submit it with --command train", EXIT_CONFIG)
    try:
        spec = job_spec(config, cfg, command, list(overrides or []), submission_id)
    except ValueError as exc:
        fail(str(exc), EXIT_CONFIG)
    for warning in spec.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if dry_run:
        out.print_json(json.dumps(spec.__dict__ | {"warnings": spec.warnings}))
        return
    try:
        jobs = client(address)
        job_id = submit_job(jobs, spec, submission_id)
    except JobError as exc:
        fail(str(exc), EXIT_RUNTIME)
    err.print(f"submitted {cfg.name} ({command}) as job {job_id}; `raytune-ft jobs logs {job_id} --follow`")
    out.print(job_id, highlight=False)
    if follow:
        _follow(jobs, job_id)


@jobs_app.command("status")
def jobs_status(job_id: JobIdArg, address: AddressOpt = None) -> None:
    """The job's status and message; once it succeeded, the export it wrote. Exit 1 if it failed or stopped."""
    from raytune_ft.jobs import JobError, client, status

    try:
        info = status(client(address), job_id)
    except JobError as exc:
        fail(str(exc), EXIT_RUNTIME)
    out.print(f"{job_id}: {info['status']}", highlight=False)
    if info["message"]:
        out.print(f"message: {info['message']}", highlight=False, soft_wrap=True)
    if info["export"]:
        out.print(f"export: {info['export']}", highlight=False, soft_wrap=True)
    if info["status"] in ("FAILED", "STOPPED"):
        raise typer.Exit(EXIT_RUNTIME)


@jobs_app.command("logs")
def jobs_logs(
    job_id: JobIdArg,
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")] = False,
) -> None:
    """The job's log (its driver's stdout and stderr)."""
    from raytune_ft.jobs import JobError, client, logs

    try:
        jobs = client(address)
        if not follow:
            sys.stdout.write(logs(jobs, job_id))
            return
    except JobError as exc:
        fail(str(exc), EXIT_RUNTIME)
    _follow(jobs, job_id)


@jobs_app.command("stop")
def jobs_stop(job_id: JobIdArg, address: AddressOpt = None) -> None:
    """Ask the cluster to stop the job (its trials and workers go with it)."""
    from raytune_ft.jobs import JobError, client, stop

    try:
        stopped = stop(client(address), job_id)
    except JobError as exc:
        fail(str(exc), EXIT_RUNTIME)
    err.print(f"job {job_id}: {'stop requested' if stopped else 'already ended'}", highlight=False)


@jobs_app.command("list")
def jobs_list(address: AddressOpt = None) -> None:
    """The cluster's jobs submitted by raytune-ft, newest first."""
    from raytune_ft.jobs import JobError, client

    try:
        found = client(address).list_jobs()
    except JobError as exc:
        fail(str(exc), EXIT_RUNTIME)
    table = Table(title="raytune-ft jobs", title_justify="left")
    for col in ("job", "experiment", "command", "status"):
        table.add_column(col)
    for info in sorted(found, key=lambda i: i.start_time or 0, reverse=True):
        meta = info.metadata or {}
        if "raytune_ft.experiment" in meta:
            state = str(getattr(info.status, "value", info.status))
            job = info.submission_id or info.job_id or "-"
            table.add_row(job, meta["raytune_ft.experiment"], meta.get("raytune_ft.command", "-"), state)
    out.print(table)


def _follow(jobs: object, job_id: str) -> None:
    from raytune_ft.jobs import JobError, follow, status

    try:
        follow(jobs, job_id, _write)
        info = status(jobs, job_id)
    except JobError as exc:
        fail(str(exc), EXIT_RUNTIME)
    err.print(f"job {job_id}: {info['status']}" + (f"; export: {info['export']}" if info["export"] else ""))
    if info["status"] != "SUCCEEDED":
        raise typer.Exit(EXIT_RUNTIME)


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()
