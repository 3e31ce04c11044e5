"""The command line as a user meets it: help, validate, data, and the commands still to come."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raytune_ft import reference
from raytune_ft.cli import app

runner = CliRunner()


def command_tree() -> list[tuple[tuple[str, ...], object]]:
    """Every command a user can type, each group's subcommands included (`bench train`, `jobs list`): (words, the
    click command), from the walk that writes the CLI reference."""
    return [(words, command) for words, command, _ in reference.command_tree() if words]


COMMANDS = [words for words, _ in command_tree()]


def experiment(tmp_path: Path, data_lines: list[str], extra: str = "") -> Path:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "reviews.tsv").write_text("\n".join(["text\tlabel", *data_lines]) + "\n")
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"name: cli-test\noutput_dir: {tmp_path / 'runs'}\n"
        "model: {name_or_path: ./model, task: sequence-classification}\n"
        "data:\n  path: reviews.tsv\n  split: {validation: 0.2, test: 0.2}\n" + extra
    )
    return path


def balanced_rows(n: int) -> list[str]:
    return [f"review number {i} is {'good' if i % 2 else 'bad'}\t{i % 2}" for i in range(n)]


def test_the_command_tree_holds_the_groups_subcommands():
    assert {("bench", "train"), ("bench", "lm"), ("bench", "tune"), ("bench", "serve"), ("bench", "soak")} <= set(
        COMMANDS
    )
    assert {("jobs", "list"), ("jobs", "status"), ("jobs", "logs"), ("jobs", "stop"), ("eval",), ("report",)} <= set(
        COMMANDS
    )


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
def test_every_command_has_help(words):
    result = runner.invoke(app, [*words, "--help"], prog_name="raytune-ft")
    assert result.exit_code == 0, result.output
    assert f"Usage: raytune-ft {' '.join(words)}" in " ".join(result.output.split())


def test_console_script_is_installed_and_prints_version():
    exe = Path(sys.executable).parent / "raytune-ft"
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("raytune-ft ")


def test_validate_prints_resolved_config(tmp_path):
    result = runner.invoke(app, ["validate", str(experiment(tmp_path, balanced_rows(4))), "train.lr=3e-5"])
    assert result.exit_code == 0, result.output
    assert "lr: 3.0e-05" in result.stdout
    assert "zero_stage: 2" in result.stdout


def test_validate_lists_every_error_and_exits_nonzero(tmp_path):
    path = experiment(tmp_path, balanced_rows(4), "train: {lr: -1, epochs: 0}\n")
    result = runner.invoke(app, ["validate", str(path), "data.max_length=0"])
    assert result.exit_code == 2
    assert "3 error(s)" in result.stderr
    assert "train.lr: must be > 0, got -1" in result.stderr
    assert "train.epochs: must be > 0, got 0" in result.stderr
    assert "override 'data.max_length=0': data.max_length: must be > 0, got 0" in result.stderr


def test_data_command_runs_pipeline_and_reuses_result(tmp_path):
    rows = balanced_rows(40) + ["review number 1 is good\t0"]  # a conflicting repeat
    path = experiment(tmp_path, rows)
    result = runner.invoke(app, ["data", str(path), "--no-tokens"])
    assert result.exit_code == 0, result.output
    assert "Data written" in result.stdout
    assert "1 repeats carry a different label" in result.stdout
    report = json.loads((tmp_path / "runs" / "cli-test" / "data" / "data_report.json").read_text())
    assert report["findings"]["exact"]["repeated_rows"] == 1
    again = runner.invoke(app, ["data", str(path), "--no-tokens", "--json"])
    assert again.exit_code == 0
    assert json.loads(again.stdout)["fingerprint"] == report["fingerprint"]


def test_data_command_names_bad_row(tmp_path):
    path = experiment(tmp_path, [*balanced_rows(10), "an odd one\t7"], "  labels: [0, 1]\n")
    result = runner.invoke(app, ["data", str(path), "--no-tokens"])
    assert result.exit_code == 1
    assert "reviews.tsv:12: label '7' is not one of data.labels" in result.stderr


def test_run_refuses_an_unknown_or_reversed_stage_before_doing_anything(tmp_path):
    path = experiment(tmp_path, balanced_rows(4))
    result = runner.invoke(app, ["run", str(path), "--from", "deploy"])
    assert result.exit_code == 2 and "unknown stage 'deploy'" in result.stderr and "data, tune" in result.stderr
    result = runner.invoke(app, ["run", str(path), "--from", "bench", "--until", "tune"])
    assert result.exit_code == 2 and "--from bench comes after --until tune" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_run_from_a_later_stage_names_the_missing_output(tmp_path):
    path = experiment(tmp_path, balanced_rows(4))
    result = runner.invoke(app, ["run", str(path), f"output_dir={tmp_path / 'out'}", "--from", "promote"])
    assert result.exit_code == 1
    assert "test_metrics.json is missing: run the 'tune' stage first" in result.stderr


def test_submit_refuses_before_contacting_a_cluster(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = experiment(tmp_path, balanced_rows(4))
    result = runner.invoke(app, ["submit", str(path)])
    assert result.exit_code == 2 and "no 'tune' section; submit it with --command train" in result.stderr
    result = runner.invoke(app, ["submit", str(path), "--command", "serve"])
    assert result.exit_code == 2 and "--command must be one of train, tune" in result.stderr
    result = runner.invoke(app, ["submit", str(path), "--command", "train"])
    assert result.exit_code == 1 and "no cluster: pass --address http://HEAD:8265" in result.stderr


def test_train_resume_needs_a_run_directory(tmp_path):
    result = runner.invoke(app, ["train", "--resume", str(tmp_path)])
    assert result.exit_code == 2
    assert "config.yaml not found" in result.stderr


def test_train_refuses_a_run_that_already_has_checkpoints(tmp_path):
    path = experiment(tmp_path, balanced_rows(20))
    (tmp_path / "runs" / "cli-test" / "train" / "step_000004").mkdir(parents=True)
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 1
    assert "already holds a training run" in result.stderr and "--resume" in result.stderr


def test_tune_needs_a_tune_section(tmp_path):
    result = runner.invoke(app, ["tune", str(experiment(tmp_path, balanced_rows(4)))])
    assert result.exit_code == 2
    assert "no 'tune' section" in result.stderr


def test_tune_resume_needs_a_tune_run_directory(tmp_path):
    result = runner.invoke(app, ["tune", "--resume", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a tune run directory" in result.stderr


@pytest.mark.parametrize("command", ["train", "tune"])
def test_an_unwritable_output_is_refused_before_anything_starts(tmp_path, command):
    extra = "tune: {search_space: {train.lr: {type: choice, values: [0.01]}}}\n" if command == "tune" else ""
    path = experiment(tmp_path, balanced_rows(10), extra)
    result = runner.invoke(app, [command, str(path), "output_dir=/proc/raytune-ft-runs"])
    assert result.exit_code == 1
    assert "/proc/raytune-ft-runs/cli-test" in result.stderr and "cannot be written" in result.stderr


def test_the_command_line_prints_a_users_error_and_keeps_a_bugs_traceback(capsys):
    """cli.common.App: an errors.RaytuneFtError ends the command with its message and exit status; anything else
    is a bug and propagates with its traceback (before, a RuntimeError from a bug became a one-line 'error')."""
    from raytune_ft.cli.common import App
    from raytune_ft.errors import InputError, RaytuneFtError

    app = App()

    @app.command()
    def stalled() -> None:
        raise RaytuneFtError("no trial of the search has run for 600 s")

    @app.command()
    def bad() -> None:
        raise InputError("tune.algorithm: unknown")

    @app.command()
    def bug() -> None:
        raise RuntimeError("an invariant broke")

    for command, status, message in (("stalled", 1, "no trial of the search"), ("bad", 2, "tune.algorithm")):
        with pytest.raises(SystemExit) as ended:
            app([command])
        assert ended.value.code == status
        printed = capsys.readouterr().err
        assert "error:" in printed and message in printed and "Traceback" not in printed
    with pytest.raises(RuntimeError, match="an invariant broke"):
        app(["bug"])
