"""What every command of the `raytune-ft` command line shares: the app, consoles, argument types, exits."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from raytune_ft.config import ConfigError, ExperimentConfig, load_config
from raytune_ft.errors import InputError, RaytuneFtError

if TYPE_CHECKING:
    from raytune_ft.console import Display


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

VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        help="Show Ray's, DeepSpeed's and transformers' own output as it comes. Without it they write to "
        "console.log in the run directory and the terminal shows one progress display.",
    ),
]

EXIT_RUNTIME, EXIT_CONFIG = RaytuneFtError.exit_code, InputError.exit_code


@contextmanager
def progress_display(log_file: Path, verbose: bool, title: str) -> Iterator[Display]:
    """The display of a long command (raytune_ft.console): its `log` for the library, the rest in LOG_FILE. Leave
    the `with` before printing an error: inside it the terminal is the display's alone."""
    from raytune_ft.console import console

    with console(log_file, verbose=verbose, title=title, before_restore=_leave_ray) as display:
        yield display


def _leave_ray() -> None:
    """Disconnect from Ray (stop an embedded one) while its output still goes to the console log: at exit, Ray's
    shutdown would write its farewells to the terminal. The command has no use for Ray after its work."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


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
