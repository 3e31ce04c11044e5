"""The `raytune-ft` command line: validate, data, train, tune, report, serve (and `bench`, in cli/bench.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from raytune_ft import __version__
from raytune_ft.cli.common import (
    EXIT_CONFIG,
    EXIT_RUNTIME,
    ConfigArg,
    OverridesArg,
    VerboseOpt,
    app,
    config_errors,
    err,
    fail,
    load_experiment,
    out,
    progress_display,
)
from raytune_ft.config import ConfigError, ExperimentConfig, config_to_yaml
from raytune_ft.console import LOG_NAME
from raytune_ft.errors import RaytuneFtError
from raytune_ft.layout import CONFIG_FILE


def _version(value: bool) -> None:
    if value:
        out.print(f"raytune-ft {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune Hugging Face models on Ray."""


@app.command()
def validate(config: ConfigArg, overrides: OverridesArg = None) -> None:
    """Check an experiment file; print the resolved config, or every error with its file line."""
    cfg = load_experiment(config, overrides)
    sys.stdout.write(config_to_yaml(cfg))
    err.print(f"[green]✓[/] {config} is valid", highlight=False, soft_wrap=True)


@app.command()
def data(
    config: ConfigArg,
    overrides: OverridesArg = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if a test split exists (the old one is moved aside).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full JSON data report.")] = False,
    no_tokens: Annotated[bool, typer.Option("--no-tokens", help="Skip the tokenizer statistics.")] = False,
) -> None:
    """Run the data pipeline (read, curate, split, tokenize) and print the data report."""
    from raytune_ft.data import DataError, prepare_data
    from raytune_ft.model_source import ModelSourceError

    cfg = load_experiment(config, overrides)
    try:
        with err.status("preparing data") as status:
            prepared = prepare_data(
                cfg, force=force, with_tokens=not no_tokens, on_stage=lambda s: status.update(f"{s}…")
            )
    except (DataError, ModelSourceError) as exc:
        fail(str(exc), EXIT_RUNTIME)
    if as_json:
        sys.stdout.write(json.dumps(prepared.report, indent=2, ensure_ascii=False) + "\n")
        return
    _print_data_report(prepared.report)
    if prepared.replaced:
        err.print(f"previous data directory moved to {prepared.replaced}", highlight=False, soft_wrap=True)
    state = "up to date, reused" if prepared.reused else "written"
    out.print(
        f"\nData {state}: {prepared.data_dir}  (report: {prepared.data_dir / 'data_report.json'})", highlight=False
    )


def _print_data_report(report: dict[str, Any]) -> None:
    src = report["source"]
    out.print(
        f"[bold]Source[/] {src['path']} ({src['format']}): {src['rows_read']} rows read, {src['rows_used']} used",
        highlight=False,
    )
    for kind, found in report["findings"].items():
        line = (
            f"  {kind} repeats: {found['repeated_rows']} rows repeat an earlier text ({found['texts_repeated']} texts)"
        )
        if "repeats_with_conflicting_label" in found:
            line += (
                f"; {found['repeats_with_conflicting_label']} repeats carry a different label "
                f"({found['texts_with_conflicting_labels']} texts, {found['rows_in_conflicting_texts']} rows)"
            )
        out.print(line, highlight=False, soft_wrap=True)

    steps = Table(title="Curation", title_justify="left")
    for col in ("step", "rows in", "rows out", "removed", "notes"):
        steps.add_column(col, justify="right" if col.startswith(("rows", "removed")) else "left")
    for step in report["steps"]:
        notes = ", ".join(
            f"{k}={v}" for k, v in step.items() if k not in ("name", "rows_in", "rows_out", "removed", "mode")
        )
        steps.add_row(step["name"], str(step["rows_in"]), str(step["rows_out"]), str(step["removed"]), notes)
    out.print(steps)

    tokens = report.get("tokens", {}).get("splits", {})
    splits = Table(
        title=f"Splits ({report['split']['strategy']}, seed {report['split']['seed']})", title_justify="left"
    )
    columns = ("split", "rows", "class balance", "words mean/p50/p95", "tokens p50/p95/max", "truncated / blocks")
    for col in columns:
        splits.add_column(col, justify="left" if col in ("split", "class balance") else "right")
    names = dict(zip(report.get("classes") or [], report.get("label_names") or [], strict=False))
    leakage = report.get("leakage") or {}
    for name, info in report["splits"].items():
        balance = info["class_balance"] or {}
        balance_text = "\n".join(f"{names.get(c, c)}: {v['rows']} ({v['fraction']:.1%})" for c, v in balance.items())
        tok = tokens.get(name, {})
        lengths = f"{tok['p50']}/{tok['p95']}/{tok['max']}" if "p50" in tok else "-"
        extra = tok.get("truncated_rows", tok.get("blocks", "-"))
        w = leakage.get("words", {}).get(name, {})
        word_lengths = f"{w['mean']}/{w['p50']}/{w['p95']}" if "mean" in w else "-"
        splits.add_row(name, str(info["rows"]), balance_text or "-", word_lengths, lengths, str(extra))
    out.print(splits)
    if leakage:
        _print_leakage(report["split"].get("grouping", {}), leakage)
    if report.get("class_weights"):
        out.print(f"class weights (train): {report['class_weights']}", highlight=False, soft_wrap=True)


def _print_leakage(grouping: dict[str, Any], leakage: dict[str, Any]) -> None:
    """Overlap of validation and test with train, with and without overlap-aware grouping; then the warnings."""
    contained = grouping.get("containment", {})
    out.print(
        f"grouping: {grouping.get('groups', '-')} groups of {grouping.get('distinct_texts', '-')} distinct texts "
        f"(largest {grouping.get('largest_groups', [])[:3]}); {contained.get('common_phrase_rows', 0)} rows of "
        "common phrases kept in train",
        highlight=False,
        soft_wrap=True,
    )
    table = Table(title="Overlap with the training split (share of rows)", title_justify="left")
    kinds = ("inside_a_training_text", "contains_a_training_text", "near_duplicate_of_a_training_text", "any")
    for col in ("split", "grouping", "inside a train text", "contains one", "near-duplicate", "any"):
        table.add_column(col, justify="left" if col in ("split", "grouping") else "right")
    for name in ("validation", "test"):
        for when, label in (("without_grouping", "by text only"), ("after_grouping", "overlap-aware")):
            found = leakage.get(name, {}).get(when, {})
            cells = [f"{found[k]['share']:.1%}" if k in found else "-" for k in kinds]
            table.add_row(name, label, *cells)
    out.print(table)
    for warning in leakage.get("warnings", []):
        err.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


def overrides_after_a_run_dir(config: Path | None, overrides: list[str] | None) -> list[str]:
    """With --resume/--replay RUN_DIR there is no experiment file: the first argument is an override."""
    if config is not None and config.suffix not in (".yaml", ".yml"):
        return [str(config), *(overrides or [])]
    return list(overrides or [])


def experiment_to_run(
    config: Path | None, overrides: list[str] | None, resume: Path | None, saved: str, what: str
) -> ExperimentConfig:
    """The experiment in CONFIG or, with --resume RUN_DIR, the one saved there as SAVED (the first argument is then
    an override); WHAT names such a directory in the error."""
    if resume is not None:
        if not (resume / saved).is_file():
            fail(f"{resume} is not a {what}: {saved} not found", EXIT_CONFIG)
        return load_experiment(resume / saved, overrides_after_a_run_dir(config, overrides))
    if config is None:
        fail("give an experiment file, or --resume RUN_DIR", EXIT_CONFIG)
    return load_experiment(config, overrides)


@app.command()
def train(
    config: Annotated[
        Path | None, typer.Argument(help="Experiment YAML file (omit with --resume).", show_default=False)
    ] = None,
    overrides: OverridesArg = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the run in this run directory from its newest whole checkpoint."),
    ] = None,
    no_export: Annotated[bool, typer.Option("--no-export", help="Skip exporting the best checkpoint.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fine-tune with DeepSpeed on Ray Train; export the best checkpoint as a Hugging Face model directory."""
    from raytune_ft.data import DataError
    from raytune_ft.model_source import ModelSourceError
    from raytune_ft.train import CheckpointError
    from raytune_ft.train import train as run_train
    from raytune_ft.train.ray_cluster import ClusterError
    from raytune_ft.train.ray_run import WorkersNotPlaced
    from raytune_ft.train.storage import StorageError

    cfg = experiment_to_run(config, overrides, resume, CONFIG_FILE, "run directory")
    try:
        with progress_display(cfg.run_dir / LOG_NAME, verbose, f"raytune-ft train {cfg.name}") as log:
            result = run_train(cfg, resume=resume is not None, export=not no_export, log=log)
    except (DataError, ModelSourceError, CheckpointError, ClusterError, StorageError, WorkersNotPlaced) as exc:
        fail(str(exc), EXIT_RUNTIME)
    table = Table(title="Best checkpoint", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(result.metrics.items()):
        if key.startswith("eval_") and "/" not in key or key in ("step", "epoch", "train_loss"):
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)
    out.print(f"checkpoint: {result.best_checkpoint}", highlight=False, soft_wrap=True)
    if result.export_dir:
        out.print(f"export: {result.export_dir}", highlight=False, soft_wrap=True)


@app.command()
def tune(
    config: Annotated[
        Path | None, typer.Argument(help="Experiment YAML file (omit with --resume or --replay).", show_default=False)
    ] = None,
    overrides: OverridesArg = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            "--run-dir",
            help="Where the search (or replay) goes; refused if it holds one. Default: OUTPUT_DIR/NAME/tune, or "
            "with --replay RUN_DIR/replays/TRIAL.",
        ),
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the interrupted search in this run directory.")
    ] = None,
    replay: Annotated[
        Path | None,
        typer.Option("--replay", help="Re-run the PBT/PB2 schedule of this run directory's winner (or --trial)."),
    ] = None,
    trial: Annotated[str | None, typer.Option("--trial", help="With --replay: the trial id to replay.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Search hyper-parameters with Ray Tune; export the winner and evaluate it once on the test split."""
    from raytune_ft.data import DataError
    from raytune_ft.model_source import ModelSourceError
    from raytune_ft.run import TuneProgress
    from raytune_ft.train import CheckpointError
    from raytune_ft.tune import MissingExtraError, replay_schedule, tune_experiment
    from raytune_ft.tune.runner import default_run_dir

    if replay is not None:
        if not (replay / CONFIG_FILE).is_file():
            fail(f"{replay} is not a tune run directory: config.yaml not found", EXIT_CONFIG)
        cfg = load_experiment(replay / CONFIG_FILE, overrides_after_a_run_dir(config, overrides))
        try:
            with progress_display(replay / LOG_NAME, verbose, f"raytune-ft tune --replay {replay}") as log:
                export = replay_schedule(replay, trial, run_dir, cfg=cfg, log=log)
        except (FileNotFoundError, FileExistsError, ValueError) as exc:
            fail(str(exc), EXIT_CONFIG)
        except (DataError, ModelSourceError, CheckpointError) as exc:
            fail(str(exc), EXIT_RUNTIME)
        except RaytuneFtError as exc:
            fail(str(exc), exc.exit_code)
        out.print(f"replayed schedule exported to {export}", highlight=False, soft_wrap=True)
        return
    cfg = experiment_to_run(config, overrides, resume, CONFIG_FILE, "tune run directory")
    run_dir = resume or run_dir
    if cfg.tune is None:
        fail(f"{config}: the experiment has no 'tune' section to search", EXIT_CONFIG)
    try:
        with progress_display(
            (run_dir or default_run_dir(cfg)) / LOG_NAME, verbose, f"raytune-ft tune {cfg.name}"
        ) as log:
            progress = TuneProgress(cfg, log)
            found = tune_experiment(cfg, run_dir, resume=resume is not None, log=log, progress=progress)
    except MissingExtraError as exc:
        fail(str(exc), EXIT_CONFIG)
    except (DataError, ModelSourceError, CheckpointError, FileExistsError, FileNotFoundError) as exc:
        fail(str(exc), EXIT_RUNTIME)
    except RaytuneFtError as exc:  # a stalled search, workers that cannot be placed, no trial to export
        fail(str(exc), exc.exit_code)
    metric = f"best_{cfg.tune.metric}"
    table = Table(title=f"Trials ({cfg.tune.algorithm}, {metric})", title_justify="left")
    keys = list(cfg.tune.search_space)
    for col in ("trial", "status", *keys, metric, "last_step"):
        table.add_column(col, justify="left" if col in ("trial", "status") else "right")
    for row in found.trials:
        values = [row["config"].get(k) for k in keys]
        cells = [row["trial"], row["status"], *[_short(v) for v in values], _short(row[metric]), str(row["last_step"])]
        table.add_row(*cells)
    out.print(table)
    out.print(f"winner: {found.best_trial} {found.best_config}", highlight=False, soft_wrap=True)
    tested = {k: v for k, v in found.test_metrics.items() if k.startswith("test_") and "/" not in k}
    out.print(f"test (read once): {json.dumps(tested)}", highlight=False, soft_wrap=True)
    out.print(f"export: {found.winner_dir}", highlight=False, soft_wrap=True)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `raytune-ft tune`.", show_default=False)],
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Where the HTML goes (default: RUN_DIR/report.html).")
    ] = None,
) -> None:
    """Write one self-contained HTML report of a tune run: curves, PBT schedule, search, winner, trials."""
    from raytune_ft.report import MissingMatplotlibError, RunDirError, write_report

    try:
        path = write_report(run_dir, out_file)
    except (RunDirError, MissingMatplotlibError) as exc:
        fail(str(exc), EXIT_CONFIG)
    except OSError as exc:
        fail(f"cannot write the report: {exc}", EXIT_RUNTIME)
    sys.stdout.write(f"{path}\n")


@app.command()
def serve(
    target: Annotated[
        str,
        typer.Argument(
            help="Export or run directory to serve (several LoRA exports, or a folder of them: adapters of one "
            "base); `stop` deletes a detached app.",
            show_default=False,
        ),
    ],
    more: Annotated[
        list[str] | None,
        typer.Argument(
            help="More exports (served as adapters of one base with TARGET), then KEY=VALUE overrides of `serve`.",
            show_default=False,
        ),
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="Leave the app running on a local Ray head (started if none) and exit.")
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="Deploy to this Ray cluster, where the app outlives the command (default: the experiment's "
            "cluster.address).",
        ),
    ] = None,
) -> None:
    """Deploy exported models behind HTTP with Ray Serve (settings: the first export's `serve` section + overrides).

    One export is served as it is. Several LoRA exports of one base model (or a folder of them) are served by one
    deployment holding the base once, the request's `model` naming the adapter."""
    from raytune_ft.serve.deploy import (
        ServeError,
        deploy,
        serve_until_interrupted,
        serving_config,
        start_detached,
        stop,
    )
    from raytune_ft.serve.model import ExportError

    log = lambda m: err.print(m, highlight=False)  # noqa: E731
    if target == "stop":
        try:
            if not stop(address, log):
                log("no raytune-ft server was running")
        except ServeError as exc:
            fail(str(exc), EXIT_RUNTIME)
        return
    # a path that exists is an export; anything else with "=" is an override
    exports = [Path(target), *(Path(a) for a in more or [] if Path(a).exists() or "=" not in a)]
    overrides = [a for a in more or [] if not Path(a).exists() and "=" in a]
    extra = [*overrides, *([f"cluster.address={address}"] if address else [])]
    try:
        cfg = serving_config(exports, extra)
    except ExportError as exc:
        fail(str(exc), EXIT_CONFIG)
    except ConfigError as exc:
        config_errors(exc, f"the settings of {exports[0]}")
    export: Path | list[Path] = exports[0] if len(exports) == 1 else exports
    from raytune_ft.train.ray_cluster import ClusterError

    try:
        url = start_detached(export, cfg, extra, log=log) if detach else deploy(export, cfg, log)
    except (ServeError, ExportError) as exc:
        fail(str(exc), EXIT_CONFIG)
    except ClusterError as exc:
        fail(str(exc), EXIT_RUNTIME)
    out.print(url, highlight=False)
    shown = ", ".join(str(p) for p in exports)
    if cfg.cluster.address is not None:
        log(f"serving {shown} at {url} on {cfg.cluster.address}; `raytune-ft serve stop --address ADDR` deletes it")
        return
    if detach:
        log(f"serving {shown} at {url}; `raytune-ft serve stop` stops it")
        return
    log(f"serving {shown} at {url} (Ctrl-C stops)")
    serve_until_interrupted(cfg.serve.port, log)


@app.command()
def run(
    config: ConfigArg,
    overrides: OverridesArg = None,
    start: Annotated[
        str | None, typer.Option("--from", help="Start at this stage (earlier stages' outputs must exist).")
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="Stop after this stage.")] = None,
    address: Annotated[
        str | None,
        typer.Option("--address", envvar="RAY_ADDRESS", help="Ray cluster to run on (default: an embedded local Ray)."),
    ] = None,
    stop_server: Annotated[
        bool, typer.Option("--stop-server", help="Stop the server after the benchmark instead of leaving it up.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """The whole job: data → tune (or train) → test once → export → promote → serve → bench → report.

    Stages: data, tune, eval, promote, serve, bench, report. A rerun skips what is complete; a winner that misses a
    `promote` threshold is not served (exit code 3)."""
    from raytune_ft.data import DataError
    from raytune_ft.model_source import ModelSourceError
    from raytune_ft.run import STAGES, NotPromoted, StageError, run_pipeline, select
    from raytune_ft.serve.deploy import ServeError
    from raytune_ft.train import CheckpointError
    from raytune_ft.train.ray_cluster import ClusterError
    from raytune_ft.tune import MissingExtraError

    extra = [*(overrides or []), *([f"cluster.address={address}"] if address else [])]
    cfg = load_experiment(config, extra)
    try:
        stages = select(start, until)
    except ValueError as exc:
        fail(f"{exc} (stages: {', '.join(STAGES)})", EXIT_CONFIG)
    serve_overrides = [o for o in overrides or [] if o.startswith("serve.")]
    try:
        with progress_display(cfg.run_dir / LOG_NAME, verbose, f"raytune-ft run {cfg.name}") as log:
            summary = run_pipeline(cfg, stages, serve_overrides=serve_overrides, stop_server=stop_server, log=log)
    except NotPromoted as exc:
        fail(str(exc), EXIT_NOT_PROMOTED)
    except MissingExtraError as exc:
        fail(str(exc), EXIT_CONFIG)
    except (DataError, ModelSourceError, CheckpointError, ClusterError, ServeError, StageError) as exc:
        fail(str(exc), EXIT_RUNTIME)
    except RaytuneFtError as exc:
        fail(str(exc), exc.exit_code)
    _print_run_summary(summary)


EXIT_NOT_PROMOTED = 3


def _print_run_summary(summary: dict[str, Any]) -> None:
    table = Table(title="Run", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for key, value in (summary.get("hyperparameters") or {}).items():
        table.add_row(key, _short(value))
    for part in ("validation", "test"):
        for key, value in (summary.get(part) or {}).items():
            if key.endswith(("_accuracy", "_f1_macro", "_loss", "_perplexity", "gen_exact", "gen_token_f1")):
                table.add_row(key, _short(value))
    promotion = summary.get("promotion")
    if promotion is not None:
        table.add_row("promoted", "yes" if promotion["promoted"] else "no")
    for level in summary.get("latency") or []:
        shown = f"p50 {level['p50_ms']:.1f} ms, p99 {level['p99_ms']:.1f} ms, {level['rps']:.1f} req/s"
        if level.get("ttft_p50_ms") is not None:  # a generation server
            shown += f", TTFT p50 {level['ttft_p50_ms']:.1f} ms, {level['output_tokens_per_s']:.1f} tokens/s"
        table.add_row(f"serve c={level['concurrency']}", shown)
    if summary.get("serve"):
        table.add_row("served at", summary["serve"]["url"])
    for key in ("export", "report", "run_dir"):
        if summary.get(key):
            table.add_row(key.replace("_", " "), summary[key])
    out.print(table)


from raytune_ft.cli import bench, evaluate, jobs  # noqa: E402,F401  (register `raytune-ft bench|eval|submit|jobs ...`)
