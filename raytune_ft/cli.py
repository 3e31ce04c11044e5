"""The `raytune-ft` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from raytune_ft import __version__
from raytune_ft.config import ConfigError, ExperimentConfig, config_to_yaml, load_config

app = typer.Typer(
    help="Fine-tune Hugging Face models on Ray: validate, prepare data, train, tune, serve, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (logs, CI) gets 120 columns instead of rich's 80 so report tables stay one row per split.
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

ConfigArg = Annotated[Path, typer.Argument(help="Experiment YAML file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted overrides such as train.lr=3e-5 data.max_length=64.", show_default=False),
]

EXIT_RUNTIME, EXIT_CONFIG = 1, 2


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _load(config: Path, overrides: list[str] | None) -> ExperimentConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        err.print(f"[bold red]{len(exc.issues)} error(s)[/] in {config}:", highlight=False, soft_wrap=True)
        for issue in exc.issues:
            err.print(f"  {issue}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None


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
    cfg = _load(config, overrides)
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

    cfg = _load(config, overrides)
    try:
        with err.status("preparing data") as status:
            prepared = prepare_data(
                cfg, force=force, with_tokens=not no_tokens, on_stage=lambda s: status.update(f"{s}…")
            )
    except (DataError, ModelSourceError) as exc:
        _fail(str(exc), EXIT_RUNTIME)
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
    for col in ("split", "rows", "class balance", "tokens p50/p95/max", "truncated / blocks"):
        splits.add_column(col, justify="left" if col in ("split", "class balance") else "right")
    names = dict(zip(report.get("classes") or [], report.get("label_names") or [], strict=False))
    for name, info in report["splits"].items():
        balance = info["class_balance"] or {}
        balance_text = "\n".join(f"{names.get(c, c)}: {v['rows']} ({v['fraction']:.1%})" for c, v in balance.items())
        tok = tokens.get(name, {})
        lengths = f"{tok['p50']}/{tok['p95']}/{tok['max']}" if "p50" in tok else "-"
        extra = tok.get("truncated_rows", tok.get("blocks", "-"))
        splits.add_row(name, str(info["rows"]), balance_text or "-", lengths, str(extra))
    out.print(splits)
    if report.get("class_weights"):
        out.print(f"class weights (train): {report['class_weights']}", highlight=False, soft_wrap=True)


def _not_yet(command: str, issue: str) -> NoReturn:
    _fail(f"'raytune-ft {command}' is not available yet in {__version__}: it arrives with '{issue}'.", EXIT_CONFIG)


@app.command()
def train(
    config: Annotated[
        Path | None, typer.Argument(help="Experiment YAML file (omit with --resume).", show_default=False)
    ] = None,
    overrides: OverridesArg = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this run directory from its last checkpoint.")
    ] = None,
    no_export: Annotated[bool, typer.Option("--no-export", help="Skip exporting the best checkpoint.")] = False,
) -> None:
    """Fine-tune with DeepSpeed on Ray Train; export the best checkpoint as a Hugging Face model directory."""
    from raytune_ft.data import DataError
    from raytune_ft.model_source import ModelSourceError
    from raytune_ft.train import CONFIG_FILE, CheckpointError
    from raytune_ft.train import train as run_train

    if resume is not None:
        if config is not None and config.suffix not in (".yaml", ".yml"):
            overrides = [str(config), *(overrides or [])]
        saved = resume / CONFIG_FILE
        if not saved.is_file():
            _fail(f"{resume} is not a run directory: {CONFIG_FILE} not found", EXIT_CONFIG)
        cfg = _load(saved, overrides)
    elif config is None:
        _fail("give an experiment file, or --resume RUN_DIR", EXIT_CONFIG)
    else:
        cfg = _load(config, overrides)
    try:
        result = run_train(
            cfg, resume=resume is not None, export=not no_export, log=lambda m: err.print(m, highlight=False)
        )
    except (DataError, ModelSourceError, CheckpointError) as exc:
        _fail(str(exc), EXIT_RUNTIME)
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
        Path | None, typer.Argument(help="Experiment YAML file (omit with --resume).", show_default=False)
    ] = None,
    overrides: OverridesArg = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Where the search goes (default: OUTPUT_DIR/NAME/tune).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the interrupted search in this run directory.")
    ] = None,
    replay: Annotated[
        Path | None,
        typer.Option("--replay", help="Re-run the PBT/PB2 schedule of this run directory's winner (or --trial)."),
    ] = None,
    trial: Annotated[str | None, typer.Option("--trial", help="With --replay: the trial id to replay.")] = None,
) -> None:
    """Search hyper-parameters with Ray Tune; export the winner and evaluate it once on the test split."""
    from raytune_ft.data import DataError
    from raytune_ft.model_source import ModelSourceError
    from raytune_ft.train import CheckpointError
    from raytune_ft.tune import MissingExtraError, replay_schedule, tune_experiment

    if replay is not None:
        if not (replay / "config.yaml").is_file():
            _fail(f"{replay} is not a tune run directory: config.yaml not found", EXIT_CONFIG)
        try:
            export = replay_schedule(replay, trial, run_dir, log=lambda m: err.print(m, highlight=False))
        except (FileNotFoundError, FileExistsError, ValueError) as exc:
            _fail(str(exc), EXIT_CONFIG)
        except (DataError, ModelSourceError, CheckpointError, RuntimeError) as exc:
            _fail(str(exc), EXIT_RUNTIME)
        out.print(f"replayed schedule exported to {export}", highlight=False, soft_wrap=True)
        return
    if resume is not None:
        if config is not None and config.suffix not in (".yaml", ".yml"):
            overrides = [str(config), *(overrides or [])]
        if not (resume / "config.yaml").is_file():
            _fail(f"{resume} is not a tune run directory: config.yaml not found", EXIT_CONFIG)
        cfg = _load(resume / "config.yaml", overrides)
        run_dir = resume
    elif config is None:
        _fail("give an experiment file, or --resume RUN_DIR", EXIT_CONFIG)
    else:
        cfg = _load(config, overrides)
    if cfg.tune is None:
        _fail(f"{config}: the experiment has no 'tune' section to search", EXIT_CONFIG)
    try:
        found = tune_experiment(cfg, run_dir, resume=resume is not None, log=lambda m: err.print(m, highlight=False))
    except MissingExtraError as exc:
        _fail(str(exc), EXIT_CONFIG)
    except (DataError, ModelSourceError, CheckpointError, FileExistsError, FileNotFoundError, RuntimeError) as exc:
        _fail(str(exc), EXIT_RUNTIME)
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
        _fail(str(exc), EXIT_CONFIG)
    except OSError as exc:
        _fail(f"cannot write the report: {exc}", EXIT_RUNTIME)
    sys.stdout.write(f"{path}\n")


@app.command()
def serve(target: Annotated[str, typer.Argument(help="Run directory or export to serve.")]) -> None:
    """Deploy an exported model behind HTTP with Ray Serve."""
    _not_yet("serve", "Serving and latency benchmark")


bench_app = typer.Typer(
    help="Benchmarks: training throughput, start-up and ZeRO memory; Tune overhead and search quality.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.command("train")
def bench_train(
    config: ConfigArg,
    overrides: OverridesArg = None,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Optimizer steps per loop (first one untimed).")] = 20,
    zero_stages: Annotated[
        str | None, typer.Option("--zero-stages", help="Also measure memory per worker of ZeRO stages, e.g. 0,2,3.")
    ] = None,
    memory_model: Annotated[
        str, typer.Option("--memory-model", help="Llama shape for the memory runs: 130m, 350m or tiny.")
    ] = "130m",
    skip_throughput: Annotated[
        bool, typer.Option("--memory-only", help="Only the ZeRO memory runs (needs --zero-stages).")
    ] = False,
    peak_tflops: Annotated[
        float | None, typer.Option("--peak-tflops", help="Accelerator peak for MFU when its name is not known.")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """Bare PyTorch loop vs the Ray Train + DeepSpeed loop on the same model, data and global batch."""
    from raytune_ft.bench import MEMORY_MODELS, bench_memory, bench_throughput
    from raytune_ft.data import DataError
    from raytune_ft.model_source import ModelSourceError

    cfg = _load(config, overrides)
    try:
        stages = [int(s) for s in zero_stages.split(",")] if zero_stages else []
    except ValueError:
        _fail(f"--zero-stages: expected numbers such as 0,2,3, got '{zero_stages}'", EXIT_CONFIG)
    if any(s not in (0, 1, 2, 3) for s in stages):
        _fail(f"--zero-stages: ZeRO stages are 0, 1, 2 and 3, got '{zero_stages}'", EXIT_CONFIG)
    if memory_model not in MEMORY_MODELS:
        _fail(f"--memory-model: expected one of {', '.join(MEMORY_MODELS)}, got '{memory_model}'", EXIT_CONFIG)
    if skip_throughput and not stages:
        _fail("--memory-only needs --zero-stages", EXIT_CONFIG)
    log = lambda m: err.print(m, highlight=False)  # noqa: E731
    result: dict[str, Any] = {}
    try:
        if not skip_throughput:
            result = bench_throughput(cfg, steps, log=log, peak_tflops=peak_tflops)
            _print_throughput(result)
        if stages:
            result["memory"] = bench_memory(cfg, stages, memory_model, log=log)
            _print_memory(result["memory"])
    except (DataError, ModelSourceError, ValueError) as exc:
        _fail(str(exc), EXIT_RUNTIME)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        err.print(f"wrote {json_path}", highlight=False)


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _print_throughput(r: dict[str, Any]) -> None:
    table = Table(
        title=f"{r['experiment']}: {r['steps']} steps x {r['global_batch']} samples, {r['workers']} worker(s), "
        f"ZeRO-{r['zero_stage']}, {r['finetune']}, {r['device']} {r['precision']}",
        title_justify="left",
    )
    for col in ("", "bare PyTorch", "Ray Train + DeepSpeed", "ratio"):
        table.add_column(col, justify="left" if not col else "right")
    for key in ("samples_per_s", "tokens_per_s", "time_to_first_step_s", "peak_rss_mb"):
        table.add_row(key, _num(r["bare"][key]), _num(r["ray"][key]), _num(r["ratios"][key], 3))
    out.print(table)
    out.print(
        f"no-op TorchTrainer time to first step: {r['noop_time_to_first_step_s']:.1f} s; "
        f"this loop's is {_num(r['startup_vs_noop'], 2)}x that "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in r['ray']['startup_s'].items())})",
        highlight=False,
        soft_wrap=True,
    )
    if r["ray"].get("mfu") is not None:
        out.print(f"model FLOPs utilisation: {r['ray']['mfu']:.1%}", highlight=False)


def _print_memory(m: dict[str, Any]) -> None:
    table = Table(
        title=f"ZeRO memory per worker: {m['model']} ({m['params'] / 1e6:.1f}M params), {m['workers']} worker(s), "
        f"block {m['block_size']}",
        title_justify="left",
    )
    for col in ("ZeRO stage", "model states MB", "DeepSpeed estimator MB", "peak RSS MB", "peak device MB"):
        table.add_column(col, justify="right")
    for stage, s in m["stages"].items():
        table.add_row(
            stage,
            _num(s["model_state_mb"], 0),
            _num(s["estimator_mb"], 0),
            _num(s["peak_rss_mb"], 0),
            _num(s["peak_device_mb"], 0),
        )
    out.print(table)
    if "zero3_vs_zero0" in m:
        out.print(
            f"ZeRO-3 / ZeRO-0 model states per worker: measured {m['zero3_vs_zero0']:.2f}, "
            f"DeepSpeed estimator {m['estimator_zero3_vs_zero0']:.2f} (peak RSS {m['zero3_vs_zero0_peak_rss']:.2f})",
            highlight=False,
        )


@bench_app.command("tune")
def bench_tune(
    config: ConfigArg,
    overrides: OverridesArg = None,
    trials: Annotated[int, typer.Option("--trials", min=2, help="Trials of the overhead runs.")] = 20,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Steps per trial of the engine overhead run.")] = 8,
    compare: Annotated[
        str | None, typer.Option("--compare", help="Also search with these algorithms, e.g. random,optuna,pbt.")
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="--compare: seeds per algorithm.")] = 3,
    samples: Annotated[int, typer.Option("--samples", min=1, help="--compare: trials per search.")] = 4,
    skip_overhead: Annotated[bool, typer.Option("--compare-only", help="Only the --compare searches.")] = False,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Where the benchmark's searches go (default OUTPUT_DIR/NAME/bench-tune)."),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """Tune's overhead (trivial trainable and the real engine: trials/min, gaps, memory per trial) and, with
    --compare, the best validation metric each search algorithm finds at equal compute."""
    from raytune_ft.bench.tune import bench_compare, bench_engine, bench_trivial
    from raytune_ft.data import DataError
    from raytune_ft.model_source import ModelSourceError
    from raytune_ft.train.trainer import ensure_ray
    from raytune_ft.tune import MissingExtraError
    from raytune_ft.tune.search import require_extra

    cfg = _load(config, overrides)
    algorithms = [a.strip() for a in compare.split(",") if a.strip()] if compare else []
    known = ("random", "grid", "optuna", "hyperopt", "bohb", "pbt", "pb2")
    if any(a not in known for a in algorithms):
        _fail(f"--compare: algorithms are {', '.join(known)}, got '{compare}'", EXIT_CONFIG)
    if skip_overhead and not algorithms:
        _fail("--compare-only needs --compare", EXIT_CONFIG)
    if algorithms and (cfg.tune is None or not cfg.tune.search_space):
        _fail(f"{config}: --compare needs a tune.search_space to search", EXIT_CONFIG)
    try:
        for algorithm in algorithms:
            require_extra(algorithm)
    except MissingExtraError as exc:
        _fail(str(exc), EXIT_CONFIG)
    root = (out_dir or Path(cfg.output_dir) / cfg.name / "bench-tune").resolve()
    if root.exists() and any(root.iterdir()):
        _fail(f"{root} is not empty; pass another --out", EXIT_CONFIG)
    log = lambda m: err.print(m, highlight=False)  # noqa: E731
    result: dict[str, Any] = {"experiment": cfg.name}
    try:
        ensure_ray(cfg)
        if not skip_overhead:
            import ray

            log(f"trivial trainable: {trials} trials")
            concurrent = max(1, int(ray.cluster_resources().get("CPU", 1)))
            result["trivial"] = bench_trivial(trials, root / "trivial", concurrent)
            log(f"the engine: {trials} trials of {steps} steps")
            result["engine"] = bench_engine(cfg, trials, steps, root / "engine", log)
            _print_tune_overhead(result)
        if algorithms:
            seeds_list = [cfg.seed + i for i in range(seeds)]
            result["compare"] = bench_compare(cfg, algorithms, seeds_list, samples, root / "compare", log)
            _print_compare(result["compare"])
    except (DataError, ModelSourceError, ValueError, RuntimeError) as exc:
        _fail(str(exc), EXIT_RUNTIME)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        err.print(f"wrote {json_path}", highlight=False)


def _print_tune_overhead(r: dict[str, Any]) -> None:
    table = Table(title="Tune overhead", title_justify="left")
    for col in ("run", "trials", "wall s", "trials/min", "gap s (mean)", "gap s (max)"):
        table.add_column(col, justify="left" if col == "run" else "right")
    rows = [(f"trivial, {k}", v) for k, v in r["trivial"].items()] + [("engine, sequential", r["engine"])]
    for name, v in rows:
        gap = v.get("gap_s") or {}
        table.add_row(
            name,
            str(v["trials"]),
            _num(v["wall_s"]),
            _num(v["trials_per_min"]),
            _num(gap.get("mean"), 2),
            _num(gap.get("max"), 2),
        )
    out.print(table)
    memory = r["engine"]["memory"]
    for key, label in (("driver_rss_mb", "driver RSS"), ("used_mb", "machine memory used")):
        if memory.get(key):
            m = memory[key]
            out.print(
                f"{label} after each trial: first {_num(m['first'])} MB, last {_num(m['last'])} MB, "
                f"growth {_num(m['growth_per_trial'], 2)} MB/trial",
                highlight=False,
            )
    if memory.get("worker_peak_rss_mb"):
        w = memory["worker_peak_rss_mb"]
        out.print(f"worker peak RSS: first trial {_num(w['first'])} MB, last {_num(w['last'])} MB", highlight=False)


def _print_compare(r: dict[str, Any]) -> None:
    table = Table(title=f"Best {r['metric']} at equal compute ({r['samples']} trials each)", title_justify="left")
    for col in ("algorithm", "seeds", "mean", "std", "min", "max", "steps trained (mean)", "wall s (mean)"):
        table.add_column(col, justify="left" if col == "algorithm" else "right")
    for name, a in r["algorithms"].items():
        b = a["best"]
        n = max(1, len(a["runs"]))
        wall = sum(run["wall_s"] for run in a["runs"]) / n
        steps = sum(run.get("steps_trained", 0) for run in a["runs"]) / n
        row = [_num(b[k], 4) for k in ("mean", "std", "min", "max")]
        table.add_row(name, str(b["n"]), *row, _num(steps, 0), _num(wall))
    out.print(table)


@app.command()
def submit(config: ConfigArg, overrides: OverridesArg = None) -> None:
    """Submit an experiment as a Ray job to a cluster."""
    _load(config, overrides)
    _not_yet("submit", "Clusters, jobs and autoscaling")


@app.command()
def run(config: ConfigArg, overrides: OverridesArg = None) -> None:
    """Run the whole pipeline: data, tune, test, export, serve, bench, report."""
    _load(config, overrides)
    _not_yet("run", "One command, end to end")


if __name__ == "__main__":
    app()
