"""`raytune-ft report`: the HTML report of a tune run directory, from small run directories written here in the
formats `raytune-ft tune` and Ray Tune write (config.yaml, trials.csv, trials/*/progress.csv, exploits.jsonl,
winner/)."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from raytune_ft.cli import app
from raytune_ft.report import RunDirError, load_run, write_report

PNG = b"\x89PNG\r\n\x1a\n"
DATE = "2026-01-02_03-04-05"
PROGRESS = [
    "eval_loss",
    "eval_accuracy",
    "train_loss",
    "step",
    "lr",
    "training_iteration",
    "trial_id",
    "time_total_s",
    "timestamp",
    "iterations_since_restore",
]
runner = CliRunner()


def write_config(run: Path, algorithm: str = "optuna", task: str = "sequence-classification") -> None:
    run.mkdir(parents=True, exist_ok=True)
    config = {
        "name": "demo",
        "model": {"task": task},
        "tune": {
            "algorithm": algorithm,
            "scheduler": "asha" if algorithm == "optuna" else "none",
            "metric": "eval_loss",
            "mode": "min",
            "search_space": {
                "train.lr": {"type": "loguniform", "low": 1e-6, "high": 1e-1},
                "train.lr_schedule": {"type": "choice", "values": ["linear", "cosine"]},
            },
        },
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def folder_name(trial_id: str, index: int, lr: float) -> str:
    return f"run_trial_{trial_id}_{index}_train_lr={lr:.4f}_{DATE}"


def write_trial(
    run: Path,
    trial_id: str,
    index: int,
    config: dict,
    losses: list[float],
    restarts: tuple[int, ...] = (),
    config_columns: list[dict] | None = None,
) -> str:
    """A Ray trial folder; `losses` are eval_loss at steps 4, 8, ...; `restarts` are report indices where the trial
    was restarted (iterations_since_restore goes back to 1)."""
    folder = run / "trials" / folder_name(trial_id, index, config["train.lr"])
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(config))
    extra = sorted({f"config/{k}" for c in config_columns or [] for k in c})
    with open(folder / "progress.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(PROGRESS + extra)
        since = 0
        for i, loss in enumerate(losses):
            since = 1 if i in restarts else since + 1
            row = [loss, 0.5 + 0.1 * i, loss + 0.05, 4 * (i + 1), 1e-3, i + 1, trial_id, 2.0 * (i + 1), 1000 + i, since]
            writer.writerow(row + [config_columns[i][k.removeprefix("config/")] for k in extra])
    return folder.name


def write_trials_csv(run: Path, rows: list[dict]) -> None:
    fields = ["trial", "status", "train.lr", "train.lr_schedule", "best_eval_loss", "iterations", "last_step", "error"]
    with open(run / "trials.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_winner(run: Path, folder: str, step: int, lr: float, tested: dict) -> None:
    winner = run / "winner"
    winner.mkdir()
    meta = {
        "experiment": {"name": "demo", "train": {"lr": lr, "lr_schedule": "linear"}},
        "checkpoint": {"path": f"/somewhere/search/trials/{folder}/checkpoint_000001", "step": step},
        "metrics": {"eval_loss": 0.41, "eval_accuracy": 0.8, "eval_f1/pos": 0.75, "step": step},
    }
    (winner / "raytune_ft.json").write_text(json.dumps(meta))
    (winner / "test_metrics.json").write_text(json.dumps(tested))


CLASSIFICATION_TEST = {
    "test_rows": 16,
    "test_loss": 0.45,
    "test_accuracy": 0.8125,
    "test_f1_macro": 0.8,
    "test_precision/neg": 0.9,
    "test_recall/neg": 0.75,
    "test_precision/pos": 0.7,
    "test_recall/pos": 0.875,
    "confusion_matrix": {"labels": ["neg", "pos"], "counts": [[6, 2], [1, 7]]},
    "slices": {
        "slices": {"web": {"rows": 9, "accuracy": 0.78, "f1_macro": 0.77}, "print": {"rows": 7, "accuracy": 0.86}},
        "worst_slice": "web",
    },
}


def optuna_run(tmp_path: Path, tested: dict | None = None) -> Path:
    run = tmp_path / "run"
    write_config(run)
    trials = [("aa11bb22", 1, 1e-5, "linear", [0.7, 0.6, 0.5]), ("cc33dd44", 2, 3e-3, "cosine", [0.69])]
    trials.append(("ee55ff66", 3, 2e-4, "linear", [0.6, 0.41]))
    rows = []
    for trial_id, index, lr, schedule, losses in trials:
        config = {"train.lr": lr, "train.lr_schedule": schedule}
        folder = write_trial(run, trial_id, index, config, losses)
        rows.append(
            {
                "trial": folder,
                "status": "TERMINATED",
                "train.lr": lr,
                "train.lr_schedule": schedule,
                "best_eval_loss": min(losses),
                "iterations": len(losses),
                "last_step": 4 * len(losses),
                "error": "",
            }
        )
    write_trials_csv(run, rows)
    write_winner(run, rows[2]["trial"], 8, 2e-4, CLASSIFICATION_TEST if tested is None else tested)
    return run


def pbt_run(tmp_path: Path) -> Path:
    """Trial 00000 starts at lr 0.01, and after its 2nd report exploits trial 00001 (restored at step 8, lr
    perturbed to 1.2e-6); the restart shows in iterations_since_restore."""
    run = tmp_path / "pbt"
    write_config(run, algorithm="pbt")
    a = write_trial(
        run,
        "1a867_00000",
        0,
        {"train.lr": 1.2e-6, "train.lr_schedule": "linear"},
        [0.9, 0.95, 0.5, 0.45],
        restarts=(2,),
    )
    b = write_trial(run, "1a867_00001", 1, {"train.lr": 1e-6, "train.lr_schedule": "linear"}, [0.7, 0.6, 0.55, 0.5])
    exploit = {
        "trial": "1a867_00000",
        "donor": "1a867_00001",
        "donor_step": 8,
        "restored_step": 8,
        "bytes_moved": 550500,
        "seconds": 24.4,
        "load_checkpoint_s": 0.013,
        "old_config": {"train.lr": 0.01, "train.lr_schedule": "linear"},
        "new_config": {"train.lr": 1.2e-06, "train.lr_schedule": "linear"},
        "donor_config": {"train.lr": 1e-06},
    }
    (run / "exploits.jsonl").write_text(json.dumps(exploit) + "\n")
    rows = [
        {
            "trial": a,
            "status": "TERMINATED",
            "train.lr": 1.2e-6,
            "train.lr_schedule": "linear",
            "best_eval_loss": 0.45,
            "iterations": 4,
            "last_step": 16,
            "error": "",
        },
        {
            "trial": b,
            "status": "TERMINATED",
            "train.lr": 1e-6,
            "train.lr_schedule": "linear",
            "best_eval_loss": 0.5,
            "iterations": 4,
            "last_step": 16,
            "error": "",
        },
    ]
    write_trials_csv(run, rows)
    write_winner(run, a, 16, 1.2e-6, CLASSIFICATION_TEST)
    return run


def images(page: str) -> dict[str, bytes]:
    found = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)"', page)
    return {alt: base64.b64decode(data) for data, alt in found}


def test_report_of_a_finished_search_has_every_figure_and_table(tmp_path):
    run = optuna_run(tmp_path)
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    figures = images(page)
    assert page.count("<img") == len(figures) == 3
    assert set(figures) == {"learning curves", "search view", "confusion matrix"}
    assert all(png.startswith(PNG) and len(png) > 5000 for png in figures.values())
    for trial_id in ("aa11bb22", "cc33dd44", "ee55ff66"):
        assert f"<td>{trial_id}</td>" in page
    assert '<tr class="winner"><td>ee55ff66</td>' in page
    assert '<td>test_accuracy</td><td class="num">0.8125</td>' in page
    assert "Per slice (test)" in page and "<td>web</td>" in page
    assert "Not applicable: optuna does not exploit" in page
    assert "Hyper-parameter schedule" not in page  # PBT/PB2 only
    assert "Missing or incomplete" not in page
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r"<script|<link|https?://", page)


def test_search_view_reads_each_trial_at_its_best_report(tmp_path):
    run = load_run(optuna_run(tmp_path))
    assert [t.id for t in run.trials] == ["aa11bb22", "cc33dd44", "ee55ff66"]  # Ray's creation order
    best = run.trial("ee55ff66")
    assert best.best == 0.41 and best.best_row == 1
    assert best.config_at_best("train.lr") == 2e-4
    assert run.winner_trial == "ee55ff66" and run.winner_step == 8


def test_pbt_report_places_the_exploit_and_draws_the_schedule(tmp_path):
    run_dir = pbt_run(tmp_path)
    run = load_run(run_dir)
    exploited = run.trial("1a867_00000")
    assert [e.row for e in exploited.exploits] == [2]  # the first report after the restart
    assert [c["train.lr"] for c in exploited.configs] == [0.01, 0.01, 1.2e-6, 1.2e-6]
    assert exploited.config_at_best("train.lr") == 1.2e-6
    assert run.trial("1a867_00001").exploits == []

    page = write_report(run_dir).read_text()
    assert set(images(page)) == {"learning curves", "hyper-parameter schedule", "search view", "confusion matrix"}
    assert "<td>550500</td>" not in page and '<td class="num">550500</td>' in page
    assert "From exploits.jsonl." in page


def test_schedule_comes_from_progress_config_columns_when_ray_writes_them(tmp_path):
    run_dir = tmp_path / "pb2"
    write_config(run_dir, algorithm="pb2")
    configs = [{"train.lr": 1e-3, "train.lr_schedule": "linear"}, {"train.lr": 5e-4, "train.lr_schedule": "cosine"}]
    write_trial(run_dir, "ab123_00000", 0, configs[-1], [0.8, 0.7], config_columns=configs)
    run = load_run(run_dir)
    assert run.trial("ab123_00000").configs == configs
    assert any("exploits.jsonl is missing" in n for n in run.notes)
    page = write_report(run_dir).read_text()
    assert "hyper-parameter schedule" in images(page)
    assert "No winner yet" in page


def test_no_confusion_matrix_without_one_in_test_metrics(tmp_path):
    tested = {"test_rows": 12, "test_loss": 2.3, "test_perplexity": 9.974}
    page = write_report(optuna_run(tmp_path, tested)).read_text()
    assert set(images(page)) == {"learning curves", "search view"}
    assert '<td>test_perplexity</td><td class="num">9.974</td>' in page


def test_partial_run_still_gets_a_report_that_names_what_is_missing(tmp_path):
    run_dir = tmp_path / "partial"
    write_config(run_dir, algorithm="pbt")
    write_trial(run_dir, "fe012_00000", 0, {"train.lr": 1e-4, "train.lr_schedule": "linear"}, [0.8, 0.7])
    write_trial(run_dir, "fe012_00001", 1, {"train.lr": 1e-2, "train.lr_schedule": "cosine"}, [])  # header only
    empty = run_dir / "trials" / folder_name("fe012_00002", 2, 0.5)
    empty.mkdir()
    (empty / "progress.csv").write_text("")  # not even a header yet
    page = write_report(run_dir).read_text()
    assert "No winner yet" in page and "winner/raytune_ft.json is missing" in page
    assert "trials.csv is missing" in page
    assert "Trial fe012_00001 has no reports yet" in page
    assert "exploits.jsonl is missing" in page
    for trial_id in ("fe012_00000", "fe012_00001", "fe012_00002"):
        assert f"<td>{trial_id}</td>" in page
    assert set(images(page)) == {"learning curves", "hyper-parameter schedule", "search view"}


def test_run_dir_with_only_a_config_gets_a_report_without_figures(tmp_path):
    write_config(tmp_path / "fresh")
    page = write_report(tmp_path / "fresh").read_text()
    assert "<img" not in page
    assert "No reports to plot." in page and "No trials found." in page


def test_strings_from_the_run_directory_are_escaped(tmp_path):
    run_dir = optuna_run(
        tmp_path, {**CLASSIFICATION_TEST, "confusion_matrix": {"labels": ["<b>", "ok"], "counts": [[1, 0], [0, 1]]}}
    )
    text = (run_dir / "trials.csv").read_text().replace("TERMINATED,1e-05", "ERROR,1e-05", 1)
    (run_dir / "trials.csv").write_text(text.replace(",\n", ",<script>alert(1)</script>\n", 1))
    page = write_report(run_dir).read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<td>ERROR</td>" in page
    assert "confusion matrix" in images(page)


def test_torn_exploits_line_is_skipped_and_noted(tmp_path):
    run_dir = pbt_run(tmp_path)
    with open(run_dir / "exploits.jsonl", "a") as fh:
        fh.write('{"trial": "1a867_00001", "don')
    run = load_run(run_dir)
    assert len(run.exploits) == 1
    assert "exploits.jsonl line 2 is not JSON; skipped" in run.notes


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_not_a_run_directory_is_a_clear_error(tmp_path, kind):
    path = tmp_path / "nothing"
    if kind == "file":
        path.write_text("x")
    elif kind == "empty":
        path.mkdir()
    with pytest.raises(RunDirError, match=re.escape(str(path))) as caught:
        write_report(path)
    assert "raytune-ft tune` run directory" in str(caught.value)
    if kind == "empty":
        assert "config.yaml" in str(caught.value) and "trials.csv" in str(caught.value)


def test_cli_report_prints_the_path(tmp_path):
    run_dir = optuna_run(tmp_path)
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(run_dir / "report.html")
    out = tmp_path / "mail" / "search.html"
    result = runner.invoke(app, ["report", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert images(out.read_text())


def test_cli_report_of_a_bad_run_dir_exits_2(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
    help_text = runner.invoke(app, ["report", "--help"])
    assert help_text.exit_code == 0 and "--out" in help_text.output


@pytest.mark.parametrize(
    "relative",
    [
        "config.yaml",
        "trials.csv",
        "exploits.jsonl",
        "winner/raytune_ft.json",
        "winner/test_metrics.json",
        f"trials/{folder_name('1a867_00000', 0, 1.2e-6)}/progress.csv",
        f"trials/{folder_name('1a867_00000', 0, 1.2e-6)}/params.json",
    ],
)
@pytest.mark.parametrize("content", ["", "[1, 2]", '{"torn": '])
def test_a_torn_or_foreign_file_does_not_stop_the_report(tmp_path, monkeypatch, relative, content):
    # the figures are built but not rasterised: drawing is what takes the time, and is covered above
    monkeypatch.setattr("raytune_ft.report.plots._png", lambda fig: PNG)
    run_dir = pbt_run(tmp_path)
    (run_dir / relative).write_text(content)
    page = write_report(run_dir).read_text()
    assert "<h2>Trials</h2>" in page and "1a867_00001" in page
