"""What every command of the `raytune-ft` command line shares: the app, consoles, argument types, exits."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from raytune_ft.config import ConfigError, ExperimentConfig, load_config
from raytune_ft.errors import InputError, RaytuneFtError


class App(typer.Typer):
    """The command line: an error raytune_ft raises for its user (errors.RaytuneFtError) is printed as one line
    and exits with its status; any other exception is a bug and keeps its traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except RaytuneFtError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(exc.exit_code)


app = App(
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

EXIT_RUNTIME, EXIT_CONFIG = RaytuneFtError.exit_code, InputError.exit_code


def fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def load_experiment(config: Path, overrides: list[str] | None, *, runs_here: bool = True) -> ExperimentConfig:
    """`runs_here=False` for an experiment that runs on a cluster (submit): this machine's CPUs do not bound it."""
    try:
        return load_config(config, overrides or [], check_resources=runs_here)
    except ConfigError as exc:
        config_errors(exc, config)


def config_errors(exc: ConfigError, origin: Path | str) -> NoReturn:
    """Print every config error with where it came from, then exit with EXIT_CONFIG."""
    err.print(f"[bold red]{len(exc.issues)} error(s)[/] in {origin}:", highlight=False, soft_wrap=True)
    for issue in exc.issues:
        err.print(f"  {issue}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(EXIT_CONFIG) from None


def num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"
