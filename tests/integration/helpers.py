"""What several integration modules use: the toy review data and experiments, HTTP requests, the `raytune-ft`
command in its own process."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from raytune_ft.config import ExperimentConfig
from raytune_ft.config.loader import validate_raw
from raytune_ft.train.checkpoint import checkpoint_step


def write_reviews(path: Path, rows: int = 160) -> Path:
    """A learnable toy task: label 1 iff the review says 'good'; a source column gives two slices."""
    rng = random.Random(0)
    lines = ["text\tlabel\tsource"]
    for i in range(rows):
        label = i % 2
        words = [rng.choice(["the", "a", "film", "movie", "is", "review", "number"]) for _ in range(rng.randint(3, 7))]
        words.insert(rng.randint(0, len(words)), "good" if label else "bad")
        lines.append(f"{' '.join(words)} {i}\t{label}\t{'web' if i % 3 else 'print'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_cfg(root: Path, name: str, model: Path, data: Path, **sections: dict) -> ExperimentConfig:
    """The tiny BERT on the toy reviews: 2 workers, ZeRO-2, 24 steps, an evaluation and a checkpoint every 6.
    Dropout off: 1 and 2 workers draw different masks, and curves that must match would part for that alone."""
    raw = {
        "name": name,
        "seed": 7,
        "output_dir": str(root),
        "model": {"name_or_path": str(model), "task": "sequence-classification"},
        "data": {
            "path": str(data),
            "max_length": 16,
            "columns": {"slice": "source"},
            "split": {"validation": 0.2, "test": 0.1},
        },
        "finetune": {"dropout": 0.0},
        "deepspeed": {"zero_stage": 2},
        "train": {
            "lr": 1e-2,
            "batch_size": 4,
            "epochs": 5,
            "max_steps": 24,
            "eval_every_steps": 6,
            "checkpoint_every_steps": 6,
            "keep_checkpoints": 8,
            "warmup_ratio": 0.1,
        },
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return validate_raw(raw, None, "test.yaml", [], base_dir=root)


def lm_cfg(root: Path, name: str, model: Path, **sections: dict) -> ExperimentConfig:
    """The tiny Llama on a corpus of short review sentences: ZeRO-3 over 2 workers, 6 steps."""
    text = "\n\n".join(f"the film number {i} is good. the movie is not bad. a review is a review." for i in range(80))
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text(text + "\n")
    raw = {
        "name": name,
        "seed": 1,
        "output_dir": str(root),
        "model": {"name_or_path": str(model), "task": "causal-lm"},
        "data": {"path": "corpus.txt", "block_size": 16, "split": {"validation": 0.1, "test": 0.1}},
        "deepspeed": {"zero_stage": 3},
        "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 6, "eval_every_steps": 3},
        "scaling": {"num_workers": 2},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return validate_raw(raw, None, "lm.yaml", [], base_dir=root)


def chat_cfg(root: Path, name: str, model: Path, conversations: Path, **sections: dict) -> ExperimentConfig:
    """The tiny chat Llama on the built conversations: LoRA on 2 workers, ZeRO-2, packed 256-token rows, 6 steps,
    an evaluation (with 8 generated answers) and a checkpoint every 3."""
    raw = {
        "name": name,
        "seed": 3,
        "output_dir": str(root),
        "model": {"name_or_path": str(model), "task": "chat"},
        "data": {
            "path": str(conversations),
            "block_size": 256,
            "columns": {"split_text": "review", "slice": "kind"},
            "chat": {"packing": True, "max_tokens": 256},
            "split": {"validation": 0.15, "test": 0.1},
        },
        "finetune": {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "deepspeed": {"zero_stage": 2},
        "train": {
            "lr": 1e-2,
            "batch_size": 2,
            "max_steps": 6,
            "eval_every_steps": 3,
            "checkpoint_every_steps": 3,
            "generation": {"prompts": 8, "max_new_tokens": 6},
        },
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return validate_raw(raw, None, "chat.yaml", [], base_dir=root)


def curve(result: object) -> list[float]:
    return [round(h["eval_loss"], 6) for h in result.history]


def with_serve(cfg: ExperimentConfig, **serve: object) -> ExperimentConfig:
    """CFG with serve settings replaced; nested keys as `limits__max_items`."""
    raw = cfg.model_dump(mode="json", by_alias=True)
    for key, value in serve.items():
        section = raw["serve"]
        *parents, leaf = key.split("__")
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    return ExperimentConfig.model_validate(raw)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(url: str, body: bytes | None = None, method: str | None = None, headers: dict | None = None):
    """(status, headers, parsed JSON body) of one HTTP request; 4xx/5xx are answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.headers, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        return exc.code, exc.headers, json.loads(payload) if payload else None


def post_json(url: str, payload: object, headers: dict | None = None):
    return request(url, json.dumps(payload).encode(), headers={"Content-Type": "application/json", **(headers or {})})


def cli(*args: str, env: dict, timeout: int = 240, sigint_ignored: bool = False) -> subprocess.CompletedProcess:
    """Run raytune-ft; `sigint_ignored` as a script's `raytune-ft ... &` does (its children inherit that). One that
    runs past TIMEOUT (inside pytest's per-test limit) fails with the end of what it printed."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "raytune_ft.cli", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
        )
    except subprocess.TimeoutExpired as exc:
        printed = "".join(part.decode() if isinstance(part, bytes) else part or "" for part in (exc.stdout, exc.stderr))
        raise AssertionError(f"raytune-ft {' '.join(args)} ran past {timeout} s:\n{printed[-4000:]}") from None


def write_experiment(path: Path, cfg: ExperimentConfig, **sections: dict) -> Path:
    """CFG as a YAML experiment file, sections replaced key by key."""
    import yaml

    raw = cfg.model_dump(mode="json", by_alias=True)
    for section, values in sections.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    path.write_text(yaml.safe_dump(raw))
    return path


def search_ran_to_a_winner(run_dir: Path, space: dict, trials: int, storage: Path | None = None) -> list[dict]:
    """A finished search in RUN_DIR (trials and checkpoints in STORAGE, when apart): TRIALS rows that ran to the end
    or were stopped, each at its own point of SPACE, Tune saw the engine's validation reports, every report is in
    each trial's result.json, and the winner was exported and tested. The rows of trials.csv."""
    rows = list(csv.DictReader(open(run_dir / "trials.csv")))
    assert len(rows) == trials and {r["status"] for r in rows} <= {"TERMINATED", "STOPPED"}, rows
    assert len({tuple(r[k] for k in space) for r in rows}) == trials  # every trial tried its own point
    assert all(float(r["best_eval_loss"]) > 0 for r in rows)
    for row in rows:
        reports = [json.loads(line) for line in open((storage or run_dir) / "trials" / row["trial"] / "result.json")]
        assert reports and reports[-1]["training_iteration"] == int(row["iterations"]), row
    assert (run_dir / "winner" / "model.safetensors").is_file()
    assert json.loads((run_dir / "winner" / "test_metrics.json").read_text())["test_rows"] > 0
    return rows


def trial_states(search) -> dict[str, str]:
    """trial id -> status, from the experiment state Tune saves for Tuner.restore."""
    states = {}
    for path in sorted((search / "trials").glob("experiment_state-*.json")):
        try:
            saved = json.loads(path.read_text())
        except ValueError:  # caught mid-write
            continue
        for trial_json, _ in saved["trial_data"]:
            trial = json.loads(trial_json)
            states[trial["trial_id"]] = trial["status"]
    return states


def reports(folder) -> list[dict]:
    path = folder / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (the embedded Ray's processes share its session)."""
    sid = os.getsid(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def checkpoints_written(search, trial: str) -> list[int]:
    """Steps of the Ray Train checkpoints a trial's workers have written, newest last (on disk as they finish,
    unlike Tune's result.json, which its logger writes in batches)."""
    return sorted(checkpoint_step(p) for p in (search / "train-runs" / trial).glob("run-*/step_*"))


def pbt_pair(interval: int, **settings: object) -> dict:
    """The tune section of a synchronous PBT search over two trials, lr 3e-3 and 1e-6, quantile 0.5 and no
    resampling: at every perturbation point the trial in the lower half exploits the other. SETTINGS add to it."""
    return {
        "algorithm": "pbt",
        "metric": "eval_loss",
        "mode": "min",
        "num_samples": 1,
        "perturbation_interval": interval,
        "quantile_fraction": 0.5,
        "resample_probability": 0.0,
        "synch": True,  # both trials meet at every point however unevenly the two cores start them
        "search_space": {"train.lr": {"type": "grid", "values": [3e-3, 1e-6]}},
        **settings,
    }
