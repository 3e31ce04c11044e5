"""Reading a `raytune-ft tune` run directory into plain data for the report.

Every file is optional: a search that is still running has no trials.csv (it is written at the end) and no
winner, a non-PBT search has no exploits, a trial that has not reported yet has an empty progress.csv. What is
missing or unreadable becomes a note in the report; only a directory holding none of the expected files is refused.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raytune_ft.config.algorithms import ALGORITHMS
from raytune_ft.errors import InputError
from raytune_ft.layout import CONFIG_FILE, METADATA, TEST_METRICS

EXPECTED = (CONFIG_FILE, "trials.csv", "trials/", "exploits.jsonl", "winner/", "export/")
# run_trial_<id>_<index>[_<short config>]_<date>; Ray's ids are "<5 hex>_<5 digits>" or 8 hex characters
FOLDER = re.compile(
    r"^run_trial_(?P<id>[0-9a-f]+(?:_\d{5})?)_(?P<tag>(?P<index>\d+)(?:_.*?)?)_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}$"
)


class RunDirError(InputError, ValueError):
    """The path is not a tune run directory (missing, not a directory, or none of the expected files)."""


@dataclass
class Exploit:
    trial: str
    donor: str | None
    donor_step: float | None
    restored_step: float | None
    new_config: dict[str, Any] | None
    record: dict[str, Any]
    old_config: dict[str, Any] | None = None
    row: int | None = None  # the trial's first report after the restore; None when it reported nothing after


@dataclass
class Trial:
    id: str
    folder: str | None = None
    index: int | None = None
    tag: str | None = None
    status: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list)  # the config each report was trained with
    initial_config: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    csv_row: dict[str, str] | None = None
    exploits: list[Exploit] = field(default_factory=list)
    result_configs: dict[tuple, dict[str, Any]] = field(default_factory=dict)
    result_exploits: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    best: float | None = None
    best_row: int | None = None

    def series(self, key: str) -> list[float | None]:
        return [_finite(row.get(key)) for row in self.rows]

    def config_at_best(self, key: str) -> Any:
        """The value a trial reached its best report with: under PBT the final config can differ from it."""
        if self.best_row is not None and key in self.configs[self.best_row]:
            return self.configs[self.best_row][key]
        if self.csv_row is not None and self.csv_row.get(key) not in (None, ""):
            return parse_value(self.csv_row[key])
        return self.params.get(key)


@dataclass
class RunData:
    run_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    metric: str = "eval_loss"
    mode: str = "min"
    algorithm: str = "?"
    trials: list[Trial] = field(default_factory=list)
    csv_columns: list[str] | None = None
    exploits: list[Exploit] = field(default_factory=list)
    exploit_source: str | None = None
    policy_decisions: int | None = None
    winner: dict[str, Any] | None = None
    winner_trial: str | None = None
    winner_step: float | None = None
    test_metrics: dict[str, Any] | None = None
    schedule: list[Any] | None = None
    x_key: str = "step"
    notes: list[str] = field(default_factory=list)

    @property
    def tune(self) -> dict[str, Any]:
        return _object(self.config.get("tune"))

    @property
    def space(self) -> dict[str, dict[str, Any]]:
        return {str(k): _object(v) for k, v in _object(self.tune.get("search_space")).items()}

    @property
    def pbt(self) -> bool:
        return self.algorithm in ALGORITHMS and ALGORITHMS[self.algorithm].perturbs

    def trial(self, trial_id: str | None) -> Trial | None:
        return next((t for t in self.trials if t.id == trial_id), None)


def parse_value(text: str | None) -> Any:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _read_json(path: Path, run: RunData) -> dict[str, Any] | None:
    """A JSON object, or None (with a note) for a file that is torn, empty or not an object."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        run.notes.append(f"{path} is unreadable ({exc}).")
        return None
    if not isinstance(loaded, dict):
        run.notes.append(f"{path} is not a JSON object; ignored.")
        return None
    return loaded


def _read_jsonl(path: Path, run: RunData) -> list[Any]:
    lines = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            lines.append(json.loads(line))
        except ValueError:
            # a driver killed mid-write leaves a torn last line; the lines before it are still good
            run.notes.append(f"{path.name} line {number} is not JSON; skipped")
    return lines


def load_run(run_dir: Path) -> RunData:
    """Everything the report shows, read from RUN_DIR; raises RunDirError when RUN_DIR is not a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunDirError(f"{run_dir} does not exist: expected a `raytune-ft tune` run directory")
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a directory: expected a `raytune-ft tune` run directory")
    if not any((run_dir / name.rstrip("/")).exists() for name in EXPECTED):
        raise RunDirError(f"{run_dir} is not a `raytune-ft tune` run directory: it holds none of {', '.join(EXPECTED)}")
    run = RunData(run_dir=run_dir)
    _read_config(run)
    experiment = _experiment_dir(run)
    if experiment is not None:
        _read_trial_folders(run, experiment)
        _read_experiment_state(run, experiment)
    _read_trials_csv(run)
    _read_exploits(run, experiment)
    _read_winner(run)
    # Ray numbers trials in the order it created them; ids are random
    run.trials.sort(key=lambda t: (t.index is None, t.index or 0, t.id))
    for trial in run.trials:
        _place_exploits(trial)
        _row_configs(trial, list(run.space))
        _best(run, trial)
    with_rows = [t for t in run.trials if t.rows]
    if with_rows and not all(isinstance(r.get("step"), float) for t in with_rows for r in t.rows):
        run.x_key = "training_iteration"
    if not with_rows:
        run.notes.append("No trial has reported yet: every progress.csv is missing or empty, so there are no curves.")
    return run


def _read_config(run: RunData) -> None:
    path = run.run_dir / CONFIG_FILE
    if not path.is_file():
        run.notes.append("config.yaml is missing: metric, mode and algorithm are guessed (eval_loss, min).")
        return
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        run.notes.append(f"config.yaml is unreadable ({exc}); metric, mode and algorithm are guessed.")
        return
    run.config = _object(loaded)
    run.metric = str(run.tune.get("metric") or run.metric)
    run.mode = "max" if run.tune.get("mode") == "max" else "min"
    run.algorithm = str(run.tune.get("algorithm") or run.algorithm)


def _experiment_dir(run: RunData) -> Path | None:
    if (run.run_dir / "trials").is_dir():
        return run.run_dir / "trials"
    storage = str(run.tune.get("storage_path") or "")
    if storage and ("://" not in storage or storage.startswith("file://")):
        local = Path(storage.removeprefix("file://")) / "trials"
        if local.is_dir():
            return local
    where = f"{storage}/trials" if storage else str(run.run_dir / "trials")
    run.notes.append(f"Ray Tune's experiment folder {where} is not readable here: no per-report curves.")
    return None


def _trial_for(run: RunData, trial_id: str) -> Trial:
    found = run.trial(trial_id)
    if found is None:
        found = Trial(id=trial_id)
        run.trials.append(found)
    return found


def _read_trial_folders(run: RunData, experiment: Path) -> None:
    for folder in sorted(p for p in experiment.iterdir() if p.is_dir() and p.name.startswith("run_trial_")):
        progress = folder / "progress.csv"
        rows = _read_csv(progress, run) if progress.is_file() else []
        match = FOLDER.match(folder.name)
        ids = {r.get("trial_id") for r in rows if isinstance(r.get("trial_id"), str)}
        trial = _trial_for(run, ids.pop() if len(ids) == 1 else match["id"] if match else folder.name)
        trial.folder, trial.rows = folder.name, rows
        if match:
            trial.index, trial.tag = int(match["index"]), match["tag"]
        if not rows:
            run.notes.append(f"Trial {trial.id} has no reports yet ({folder.name}/progress.csv missing or empty).")
        if (folder / "params.json").is_file():
            trial.params = _read_json(folder / "params.json", run) or {}
        if (folder / "error.txt").is_file():
            trial.error = next(iter(folder.joinpath("error.txt").read_text(errors="replace").splitlines()), "")
        if (folder / "result.json").is_file():
            _read_results(trial, folder / "result.json")


def _read_csv(path: Path, run: RunData) -> list[dict[str, Any]]:
    try:
        with open(path, newline="", errors="replace") as fh:
            return [{k: parse_value(v) for k, v in r.items() if k is not None} for r in csv.DictReader(fh)]
    except csv.Error as exc:
        run.notes.append(f"{path} is not a readable CSV ({exc}); its reports are left out.")
        return []


def _read_results(trial: Trial, path: Path) -> None:
    """result.json carries the config each report was trained with, which progress.csv leaves out."""
    for line in path.read_text(errors="replace").splitlines():
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if not isinstance(result, dict):
            continue
        key = (_finite(result.get("training_iteration")), _finite(result.get("timestamp")))
        if isinstance(result.get("config"), dict):
            trial.result_configs[key] = result["config"]
        record = result.get("raytune_ft_exploit")
        if isinstance(record, dict) and record.get("exploit"):
            trial.result_exploits.append(record)


def _read_experiment_state(run: RunData, experiment: Path) -> None:
    """Ray's experiment_state-*.json: each trial's status and the config it was sampled with."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return
    state = _read_json(states[-1], run) or {}
    for entry in state.get("trial_data", []):
        try:
            info = json.loads(entry[0])
        except (TypeError, ValueError, IndexError):
            continue
        if not isinstance(info, dict) or not info.get("trial_id"):
            continue
        trial = _trial_for(run, str(info["trial_id"]))
        trial.status = info.get("status") or trial.status
        trial.folder = trial.folder or info.get("relative_logdir")
        if isinstance(info.get("evaluated_params"), dict):
            trial.initial_config = info["evaluated_params"]


def _read_trials_csv(run: RunData) -> None:
    path = run.run_dir / "trials.csv"
    if not path.is_file():
        run.notes.append(
            "trials.csv is missing (it is written when the search ends); the trials table is "
            "built from Ray's trial folders."
        )
        return
    with open(path, newline="", errors="replace") as fh:
        reader = csv.DictReader(fh)
        try:
            rows = list(reader)
        except csv.Error as exc:
            run.notes.append(f"trials.csv is not a readable CSV ({exc}); the trials table is built from Ray's folders.")
            return
        columns = list(reader.fieldnames or [])
    if "trial" not in columns:
        run.notes.append("trials.csv has no 'trial' column; the trials table is built from Ray's trial folders.")
        return
    run.csv_columns = columns
    by_folder = {t.folder: t for t in run.trials if t.folder}
    for row in rows:
        name = row.get("trial")
        if not name:
            continue
        match = FOLDER.match(name)
        trial = by_folder.get(name) or _trial_for(run, match["id"] if match else name)
        trial.folder = trial.folder or name
        trial.csv_row = row
        trial.status = row.get("status") or trial.status
        trial.error = row.get("error") or trial.error


def _read_exploits(run: RunData, experiment: Path | None) -> None:
    path = run.run_dir / "exploits.jsonl"
    global_policy = experiment / "pbt_global.txt" if experiment else None
    decisions = _read_jsonl(global_policy, run) if global_policy and global_policy.is_file() else None
    run.policy_decisions = len(decisions) if decisions is not None else None
    if path.is_file():
        run.exploit_source = "exploits.jsonl"
        for r in _read_jsonl(path, run):
            if isinstance(r, dict) and r.get("trial"):
                run.exploits.append(_exploit(r, r.get("old_config")))
    elif any(t.result_exploits for t in run.trials):
        run.exploit_source = "the trials' result.json"
        for trial in run.trials:
            for r in trial.result_exploits:
                record = {k: v for k, v in r.items() if k not in ("exploit", "donor_checkpoint", "old_config")}
                run.exploits.append(_exploit({**record, "donor_config": r.get("old_config")}, None))
    elif decisions:
        run.exploit_source = "Ray's pbt_global.txt (its decisions: one taken as its trial finished never ran)"
        by_tag = {t.tag: t for t in run.trials if t.tag}
        for line in decisions:
            if not (isinstance(line, list) and len(line) == 6 and isinstance(line[0], str) and line[0] in by_tag):
                continue
            donor = by_tag.get(line[1]) if isinstance(line[1], str) else None
            step = _step_at(donor, line[3])
            run.exploits.append(
                _exploit(
                    {
                        "trial": by_tag[line[0]].id,
                        "donor": donor.id if donor else line[1],
                        "donor_step": step,
                        "restored_step": step,
                        "target_iteration": line[2],
                        "donor_iteration": line[3],
                        "donor_config": line[4],
                        "new_config": line[5],
                    },
                    None,
                )
            )
    elif run.pbt:
        run.notes.append(f"No exploits recorded: exploits.jsonl is missing ({run.algorithm} has not exploited yet).")
    for exploit in run.exploits:
        _trial_for(run, exploit.trial).exploits.append(exploit)


def _exploit(record: dict[str, Any], old_config: dict[str, Any] | None) -> Exploit:
    return Exploit(
        trial=str(record["trial"]),
        donor=record.get("donor"),
        donor_step=_finite(record.get("donor_step")),
        restored_step=_finite(record.get("restored_step", record.get("donor_step"))),
        new_config=record.get("new_config") if isinstance(record.get("new_config"), dict) else None,
        old_config=old_config if isinstance(old_config, dict) else None,
        record=record,
    )


def _step_at(trial: Trial | None, iteration: Any) -> float | None:
    for row in trial.rows if trial else []:
        if row.get("training_iteration") == _finite(iteration):
            return _finite(row.get("step"))
    return None


def _read_winner(run: RunData) -> None:
    winner = run.run_dir / "winner"
    if not winner.is_dir() and (run.run_dir / "export").is_dir():
        winner = run.run_dir / "export"  # a single `raytune-ft train` run: its export is the winner
    meta = winner / METADATA
    if not meta.is_file():
        run.notes.append(
            f"No winner yet: {meta.relative_to(run.run_dir)} is missing (the search has not finished, or its "
            "export failed), so there are no winner or test metrics."
        )
    else:
        run.winner = _read_json(meta, run)
        checkpoint = _object((run.winner or {}).get("checkpoint"))
        folder = Path(str(checkpoint.get("path") or "")).parent.name
        found = next((t for t in run.trials if t.folder == folder), None)
        match = FOLDER.match(folder)
        run.winner_trial = found.id if found else match["id"] if match else None
        run.winner_step = _finite(checkpoint.get("step"))
    tested = winner / TEST_METRICS
    if tested.is_file():
        run.test_metrics = _read_json(tested, run)
    elif run.winner is not None:
        run.notes.append("winner/test_metrics.json is missing: the winner was exported but not tested.")
    if (winner / "schedule.json").is_file():
        try:
            loaded = json.loads((winner / "schedule.json").read_text())
        except (OSError, ValueError):
            loaded = None
        if isinstance(loaded, list):
            run.schedule = loaded
        else:
            run.notes.append("winner/schedule.json is unreadable or not a list; its schedule is not shown.")


def _place_exploits(trial: Trial) -> None:
    """Which report each restore shows up in: the first report of a restarted run (iterations_since_restore is 1)
    past the restored step. Row 0 cannot be one: a trial exploits only after it has reported."""
    restarts = any("iterations_since_restore" in r for r in trial.rows)
    start = 1
    for exploit in trial.exploits:
        for j in range(start, len(trial.rows)):
            row = trial.rows[j]
            if restarts and row.get("iterations_since_restore") != 1:
                continue
            step = _finite(row.get("step"))
            if exploit.restored_step is not None and step is not None and step <= exploit.restored_step:
                continue
            exploit.row, start = j, j + 1
            break
        else:
            start = len(trial.rows)


def _row_configs(trial: Trial, keys: list[str]) -> None:
    """The config behind every report: progress.csv's hp/ (or config/) columns if present, else result.json's, else
    the sampled config changed at each placed exploit."""
    first = next((e.old_config for e in trial.exploits if e.old_config), None)
    current = dict(trial.initial_config or first or trial.params or {})
    if not current and trial.csv_row is not None:
        current = {k: parse_value(trial.csv_row[k]) for k in keys if trial.csv_row.get(k) not in (None, "")}
    applied = {e.row: e for e in trial.exploits if e.row is not None and e.new_config}
    trial.configs = []
    for j, row in enumerate(trial.rows):
        if j in applied:
            current = {**current, **applied[j].new_config}
        config = dict(current)
        config.update(
            trial.result_configs.get((_finite(row.get("training_iteration")), _finite(row.get("timestamp"))), {})
        )
        # hp/ columns: the values a trial reports it trained with (raytune_ft writes them into every report)
        config.update(
            {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith(("config/", "hp/")) and v is not None}
        )
        trial.configs.append(config)


def _best(run: RunData, trial: Trial) -> None:
    sign = 1 if run.mode == "min" else -1
    values = [(sign * v, j) for j, v in enumerate(trial.series(run.metric)) if v is not None]
    if values:
        trial.best_row = min(values)[1]
        trial.best = sign * min(values)[0]
    from_csv = _finite(parse_value((trial.csv_row or {}).get(f"best_{run.metric}")))
    if from_csv is not None:
        trial.best = from_csv
