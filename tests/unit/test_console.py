"""The console of long commands (raytune_ft.console): real descriptor redirection in a child process, the warning
summary of lines Ray, DeepSpeed and transformers really printed, and the display rendered by rich."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from raytune_ft.console import Display, evaluation_line, normalised, tell, warning_summary, warnings_in

# Lines from this project's console logs (Ray 2.60, DeepSpeed, transformers), colours and all; the C++ one is in
# the format of Ray's C++ logs
RAYLET = (
    "\x1b[33m(raylet)\x1b[0m WARNING: {n} PYTHON worker processes have been started on node: "
    "e3db7ce5a727faa175b8b132ac2a7c4afba253581eba049e08343210 with address: 192.0.2.2, which is 8x the maximum "
    "expected startup concurrency (2)."
)
NOISE = [
    "2026-12-07 10:33:28,905\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this "
    "Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "2026-12-07 10:33:44,843\tINFO worker.py:2029 -- Started a local Ray instance.",
    RAYLET.format(n=8),
    RAYLET.format(n=16),
    RAYLET.format(n=18),
    "\x1b[36m(RayTrainWorker pid=1098)\x1b[0m - MISSING:\tthose params were newly initialized because missing from "
    "the checkpoint. Consider training on your downstream task.",
    "\x1b[36m(RayTrainWorker pid=1098)\x1b[0m /work/main/.venv/lib/python3.11/site-packages/transformers/"
    "modeling_utils.py:3314: FutureWarning: `is_gradient_checkpointing` is deprecated and will be removed in v6.",
    "\x1b[36m(RayTrainWorker pid=1098)\x1b[0m   warnings.warn(",
    "\x1b[36m(RayTrainWorker pid=1098)\x1b[0m [2026-12-07 10:34:08,012] [WARNING] [real_accelerator.py:213:"
    "get_accelerator] Setting accelerator to CPU.",
    "[2026-12-07 10:34:27,673] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.",
    "[2026-12-07 10:35:05,675 E 1234 5678] core_worker.cc:2501: Failed to kill PreemptionWatcher actor.",
    "\x1b[36m(RayTrainWorker pid=1098)\x1b[0m [raytune-ft rank 0] step 8/24 | train_loss 0.7026 | eval_loss 0.6852",
    "\x1b[36m(run_trial pid=11919)\x1b[0m Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x)"
    "\x1b[32m [repeated 2x across cluster] (Ray deduplicates logs by default.)",
]

CHILD = textwrap.dedent(
    """
    import os, subprocess, sys
    from pathlib import Path
    from raytune_ft.console import console, tell

    log = Path(sys.argv[1])
    with console(log, title="raytune-ft test") as display:
        display("preparing data")
        print("print() of the driver")
        os.write(2, {cpp!r}.encode() + b"\\n")
        subprocess.run([sys.executable, "-c", "import os; os.write(1, {raylet!r}.encode() + b'\\\\n')"], check=True)
        subprocess.run(["sh", "-c", "echo a worker line >&2"], check=True)
        metrics = {{"step": 8, "train_loss": 0.7, "eval_loss": 0.6}}
        tell(display, "step 8/24 | train_loss 0.7000 | eval_loss 0.6000", "evaluation", metrics=metrics, total=24)
        if sys.argv[2] == "raise":
            raise RuntimeError("a bug in the command")
    print("after the display: the terminal again")
    """
).format(cpp=NOISE[10], raylet=RAYLET.format(n=8))


def run_child(tmp_path: Path, how: str) -> tuple[subprocess.CompletedProcess, Path]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    log = tmp_path / "run" / "console.log"
    done = subprocess.run([sys.executable, str(script), str(log), how], capture_output=True, text=True, timeout=60)
    return done, log


def test_output_of_the_process_and_its_children_goes_to_the_log_and_the_display_to_the_terminal(tmp_path):
    done, log = run_child(tmp_path, "ok")
    assert done.returncode == 0, done.stderr
    kept = log.read_text()
    for line in ("print() of the driver", "core_worker.cc:2501", "e3db7ce5a727", "a worker line"):
        assert line in kept and line not in done.stdout + done.stderr
    # the terminal: the log's path, the note, the evaluation once, the summary, then the restored descriptors
    lines = done.stderr.splitlines()
    assert lines[:3] == [
        f"console log (Ray, DeepSpeed, transformers): {log}",
        "preparing data",
        "step 8/24 | train_loss 0.7000 | eval_loss 0.6000",
    ]
    assert lines[3].startswith(f"2 warning/error line(s) from Ray/DeepSpeed/transformers in {log}: ")
    assert "1 × 'N PYTHON worker processes have been started on node: … with…'" in lines[3]
    assert done.stdout == "after the display: the terminal again\n"
    assert "\x1b[" not in done.stderr  # plain lines when the output is not a terminal


def test_a_bug_inside_the_display_reaches_the_terminal_and_the_log(tmp_path):
    done, log = run_child(tmp_path, "raise")
    assert done.returncode == 1
    assert "RuntimeError: a bug in the command" in done.stderr and "Traceback" in done.stderr
    assert "RuntimeError: a bug in the command" in log.read_text()
    assert "after the display" not in done.stdout


def test_a_second_command_appends_to_the_log_and_summarises_only_its_own_warnings(tmp_path):
    run_child(tmp_path, "ok")
    done, log = run_child(tmp_path, "ok")
    assert log.read_text().count("==== ") == 2
    assert "2 warning/error line(s)" in done.stderr


def test_warnings_are_counted_by_their_message_whatever_the_process_time_or_number():
    found = warnings_in("\n".join(NOISE))
    assert found == {
        "N PYTHON worker processes have been started on node: … with…": 3,
        "Setting accelerator to CPU.": 2,
        "Token authentication is enabled for this Ray cluster. Set R…": 1,
        "- MISSING: those params were newly initialized because miss…": 1,
        "FutureWarning: `is_gradient_checkpointing` is deprecated an…": 1,
        "core_worker.cc:N: Failed to kill PreemptionWatcher actor.": 1,
    }
    summary = warning_summary(found, Path("run/console.log"), shown=2)
    assert summary == (
        "9 warning/error line(s) from Ray/DeepSpeed/transformers in run/console.log: "
        "3 × 'N PYTHON worker processes have been started on node: … with…', "
        "2 × 'Setting accelerator to CPU.', and 4 more kinds"
    )
    assert warning_summary(warnings_in(NOISE[1]), Path("x")) is None
    assert normalised(NOISE[3]) == normalised(NOISE[4])


def test_an_evaluation_reads_like_the_workers_line():
    metrics = {
        "step": 8,
        "train_loss": 0.70258,
        "eval_loss": 0.68524,
        "eval_accuracy": 0.55330,
        "eval_f1_macro": 0.35621,
        "eval_whole_accuracy": 0.56398,
        "samples_per_s": 35.49,
        "lr": 0.006,
    }
    assert evaluation_line(metrics, 24, eta_s=6.0) == (
        "step 8/24 | train_loss 0.7026 | eval_loss 0.6852 | eval_accuracy 0.5533 | eval_f1_macro 0.3562 | "
        "eval_whole_accuracy 0.5640 | 35.5 samples/s, ETA 0.1 min"
    )
    assert evaluation_line({"step": 3, "eval_perplexity": 12.5}, 6) == "step 3/6 | eval_perplexity 12.5000"


def events(display: Display) -> None:
    stages = ["data", "tune", "eval", "promote", "serve", "bench", "report"]
    tell(display, "[2/7] tune", "stage", number=2, names=stages)
    rows = [
        {"trial": "a_00000", "status": "RUNNING", "step": 8, "total": 16, "value": 0.8125, "best": 0.8125},
        {"trial": "a_00001", "status": "PENDING", "step": None, "total": None, "value": None, "best": None},
    ]
    tell(
        display,
        "tune: 0/2 trials finished, 1 running | best eval_accuracy 0.8125 (trial a_00000, step 8)",
        "trials",
        rows=rows,
        metric="eval_accuracy",
        headline="0/2 trials finished, 1 running | best eval_accuracy 0.8125 (trial a_00000, step 8)",
        live_line="trial a_00000: step 8/16 | eval_accuracy 0.8125",
    )
    display("a note")


def test_plain_display_prints_one_line_per_event_and_verbose_leaves_evaluations_to_the_workers():
    stream = io.StringIO()
    display = Display(stream)
    events(display)
    tell(display, "step 8/16 | eval_loss 0.5000", "evaluation", metrics={"step": 8, "eval_loss": 0.5}, total=16)
    assert stream.getvalue().splitlines() == [
        "[2/7] tune",
        "tune: 0/2 trials finished, 1 running | best eval_accuracy 0.8125 (trial a_00000, step 8)",
        "a note",
        "step 8/16 | eval_loss 0.5000",
    ]
    quiet = io.StringIO()
    tell(Display(quiet, verbose=True), "step 8/16", "evaluation", metrics={"step": 8}, total=16)
    assert quiet.getvalue() == ""
    printed: list[str] = []
    tell(printed.append, "step 8/16", "evaluation", metrics={"step": 8}, total=16)  # a plain `log` gets the line
    assert printed == ["step 8/16"]


def test_live_display_renders_the_stage_the_trials_and_the_training_run():
    display = Display(io.StringIO(), title="raytune-ft run e2e")
    events(display)
    tell(
        display,
        "step 8/16",
        "evaluation",
        metrics={"step": 8, "train_loss": 0.7, "eval_loss": 0.5},
        total=16,
        eta_s=30.0,
    )
    screen = Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None)
    screen.print(display.render())
    shown = screen.file.getvalue()
    assert "raytune-ft run e2e  0:00" in shown
    assert "data → tune → eval → promote → serve → bench → report" in shown
    [running] = [line for line in shown.splitlines() if line.startswith("a_00000")]
    assert running.split() == ["a_00000", "RUNNING", "8/16", "0.8125", "0.8125"]
    assert "0/2 trials finished, 1 running" in shown
    assert "step 8/16 | train_loss 0.7000 | eval_loss 0.5000 | ETA 0.5 min" in shown


def test_live_display_prints_each_note_and_evaluation_once_above_the_view():
    stream = io.StringIO()
    display = Display(stream, live=True, title="raytune-ft tune")
    events(display)
    display.close()
    printed = stream.getvalue()
    assert printed.count("trial a_00000: step 8/16 | eval_accuracy 0.8125") == 1 and printed.count("a note") == 1
    assert "tune: 0/2 trials finished" not in printed  # the view's table says it


def test_tune_progress_feeds_the_display_a_table_row_per_trial(tmp_path):
    from raytune_ft.config import load_config
    from raytune_ft.run import TuneProgress

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "d.tsv").write_text("text\tlabel\na\t0\n")
    path = tmp_path / "exp.yaml"
    path.write_text(
        "name: t\nmodel: {name_or_path: ./model, task: sequence-classification}\ndata: {path: d.tsv}\n"
        "tune: {metric: eval_loss, mode: min, search_space: {train.lr: {type: grid, values: [0.1, 0.01]}}}\n"
    )
    stream = io.StringIO()
    display = Display(stream)
    progress = TuneProgress(load_config(path), display)
    trials = [SimpleNamespace(trial_id="a", status="RUNNING", last_result={}) for _ in range(1)]
    trials.append(SimpleNamespace(trial_id="b", status="PENDING", last_result={}))
    progress(trials, {"trial_id": "a", "step": 4, "total_steps": 8, "eval_loss": 0.5, "train_loss": 0.6})
    progress.ended(SimpleNamespace(trial_id="a"), "finished")
    assert stream.getvalue().splitlines() == [
        "tune: 0/2 trials finished, 1 running | best eval_loss 0.5000 (trial a, step 4) | 25% of steps"
        " | trial a at step 4: eval_loss 0.5000",
        "tune: trial a finished (best eval_loss 0.5000)",
    ]
    # the view: a row per trial, the one that ended marked so, and the counts with it
    assert [(r["trial"], r["status"], r["step"], r["best"]) for r in display.trials["rows"]] == [
        ("a", "TERMINATED", 4, 0.5),
        ("b", "PENDING", None, None),
    ]
    assert display.trials["headline"].startswith("1/2 trials finished, 0 running | best eval_loss 0.5000")
    # a PBT exploit, as exploits.jsonl records it, is a trial event of its own
    progress.exploited(
        {"trial": "b", "donor": "a", "donor_step": 4, "bytes_moved": 1_549_158, "seconds": 13.116}
        | {"old_config": {"train.lr": 0.011125895}, "new_config": {"train.lr": 0.0057158}}
    )
    assert stream.getvalue().splitlines()[-1] == (
        "tune: trial b exploited trial a at step 4 (1.5 MB restored in 13.1 s); train.lr 0.01113 -> 0.005716"
    )


def test_reports_of_a_training_run_reach_the_display_once(tmp_path):
    """The driver follows the file the run's controller appends to (trainer.reports_to_file); a worker group
    restarted at a checkpoint reports it again, and a line still being written waits for its end."""
    from raytune_ft.train.trainer import ReportsFollowed

    reports = tmp_path / "reports.jsonl"
    first = json.dumps({"step": 8, "total_steps": 16, "train_loss": 0.7, "eval_loss": 0.5, "samples_per_s": 32.0})
    reports.write_text(json.dumps({"step": 4, "total_steps": 16}) + "\n")  # an earlier command's
    stream = io.StringIO()
    display = Display(stream)
    with ReportsFollowed(reports, display, batch=16, every_s=0.05):
        with open(reports, "a") as fh:
            fh.write(first + "\n" + first + "\n" + '{"step": 16, "total')
    assert stream.getvalue() == "step 8/16 | train_loss 0.7000 | eval_loss 0.5000 | 32.0 samples/s, ETA 0.1 min\n"
    assert display.train["best"] == "best eval_loss 0.5000 (step 8)"
    # a plain `log` has the workers' own lines: nothing is followed for it
    printed: list[str] = []
    other = tmp_path / "other.jsonl"
    with ReportsFollowed(other, printed.append, batch=16, every_s=0.05):
        other.write_text(first + "\n")
    assert printed == []
