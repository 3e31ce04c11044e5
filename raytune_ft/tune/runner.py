"""`raytune-ft tune`: Ray Tune around the training engine, then one winner exported and tested once.

RUN_DIR layout: config.yaml (resolved), trials.csv, trials/ (Ray Tune's experiment: trial folders, checkpoints,
pbt_policy_*.txt), train-runs/ (each trial's Ray Train runs), exploits.jsonl (PBT/PB2), winner/ (the export),
winner/test_metrics.json.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytune_ft.config import ExperimentConfig, config_to_yaml
from raytune_ft.tune.search import require_extra, scheduler, search_algorithm
from raytune_ft.tune.space import param_space, trial_experiment
from raytune_ft.tune.trial import EXPLOIT_KEY, run_trial

EXPERIMENT = "trials"


@dataclass
class TuneRun:
    run_dir: Path
    best_trial: str
    best_config: dict[str, Any]
    best_metrics: dict[str, Any]
    winner_dir: Path
    test_metrics: dict[str, Any]
    trials: list[dict[str, Any]]


def default_run_dir(cfg: ExperimentConfig) -> Path:
    return (Path(cfg.output_dir) / cfg.name / "tune").resolve()


def concurrent_trials(cfg: ExperimentConfig, cluster: dict[str, float]) -> int:
    """Trials that fit side by side: each is a Ray Train run holding its workers' CPUs (and GPUs)."""
    fits = [cluster.get("CPU", 1) // (cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)]
    if cfg.scaling.use_gpu:
        gpus = cfg.scaling.gpus_per_worker or 1.0
        fits.append(cluster.get("GPU", 0) // (cfg.scaling.num_workers * gpus))
    return max(1, int(min(fits)))


class ExperimentLog:
    """Driver-side Tune callback: writes exploits.jsonl and deletes checkpoints nobody can need any more."""

    def __init__(self, run_dir: Path, keep: int, metric: str, mode: str, pbt: Any) -> None:
        self.exploits = run_dir / "exploits.jsonl"
        self.keep, self.metric, self.mode, self.pbt = keep, metric, mode, pbt
        self.last_config: dict[str, dict[str, Any]] = {}
        self.scores: dict[str, float] = {}  # checkpoint path -> metric
        self.logged: set[tuple] = set()

    def on_trial_result(self, trials: list[Any], trial: Any, result: dict[str, Any]) -> None:
        record = result.get(EXPLOIT_KEY)
        key = (trial.trial_id, record and record.get("donor_checkpoint"), record and record.get("seconds"))
        if record and record.get("exploit") and key not in self.logged:
            self.logged.add(key)
            line = {
                "trial": trial.trial_id,
                "donor": record["donor"],
                "donor_step": record["donor_step"],
                "restored_step": record["restored_step"],
                "bytes_moved": record["bytes_moved"],
                "seconds": round(record["seconds"], 3),
                "load_checkpoint_s": record.get("load_checkpoint_s"),
                "old_config": self.last_config.get(trial.trial_id),
                "new_config": record["new_config"],
                "donor_config": record.get("old_config"),
            }
            with open(self.exploits, "a") as fh:
                fh.write(json.dumps(line, default=str) + "\n")
        # the config this result was trained with: PBT may already have replaced trial.config for the next run
        self.last_config[trial.trial_id] = dict(result.get("config") or trial.config)
        # the folder this result's checkpoint went to, as Tune names it in the result itself
        folder = result.get("checkpoint_dir_name")
        if folder and trial.path and self.metric in result:
            self.scores[str(Path(trial.path) / folder)] = float(result[self.metric])
        self.prune(trials)

    def pinned(self, trials: list[Any]) -> set[str]:
        """Checkpoints a pending restore or a PBT exploit may still read."""
        keep = set()
        for t in trials:
            if t.checkpoint is not None and t.status in ("PENDING", "PAUSED"):
                keep.add(t.checkpoint.path)
        for state in getattr(self.pbt, "_trial_state", {}).values():
            last = getattr(state, "last_checkpoint", None)
            if getattr(last, "path", None):
                keep.add(last.path)
        return keep

    def prune(self, trials: list[Any]) -> None:
        pinned = self.pinned(trials)
        sign = -1 if self.mode == "max" else 1
        for t in trials:
            folders = sorted(Path(t.path).glob("checkpoint_*")) if t.path else []
            if len(folders) <= self.keep:
                continue
            newest = {str(f) for f in folders[-self.keep :]}
            scored = [f for f in folders if str(f) in self.scores]
            best = {str(min(scored, key=lambda f: sign * self.scores[str(f)]))} if scored else set()
            for folder in folders:
                path = str(folder)
                if path not in newest | best | pinned:
                    shutil.rmtree(folder, ignore_errors=True)


def tune_experiment(
    cfg: ExperimentConfig,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> TuneRun:
    import ray
    from ray import tune

    from raytune_ft.train.trainer import ensure_ray, prepare_worker_data

    if cfg.tune is None:
        raise ValueError("the experiment has no tune section")
    settings = cfg.tune
    require_extra(settings.algorithm)
    run_dir = Path(run_dir).resolve() if run_dir else default_run_dir(cfg)
    if (run_dir / "winner" / "test_metrics.json").exists():
        raise FileExistsError(f"{run_dir} already holds a finished search; choose another --run-dir")
    if (run_dir / EXPERIMENT).exists() and not resume:
        raise FileExistsError(f"{run_dir} holds an unfinished search: continue it with `raytune-ft tune --resume`")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))

    log("preparing data")
    worker_data = prepare_worker_data(cfg)
    ensure_ray(cfg)
    shared = {
        "experiment": cfg.model_dump(mode="json", by_alias=True),
        "train_storage": str(run_dir / "train-runs"),
        "loop_config": {
            "data": ray.put(worker_data["data"]),
            "classes": worker_data["classes"],
            "class_weights": worker_data["class_weights"],
            "pad_token_id": worker_data["pad_token_id"],
        },
    }
    evaluations = _evaluations_per_trial(cfg, len(worker_data["data"]["train"]["input_ids"]))
    trial_scheduler = scheduler(settings, evaluations)
    callback = _callback(run_dir, settings, trial_scheduler)
    # The trial function only waits on its Ray Train run, whose workers hold the CPUs/GPUs. Tune refuses an empty
    # request, and even 0.01 CPU per trial would leave N trials' workers N x 0.01 CPU short: ask for 1 byte instead.
    trainable = tune.with_resources(tune.with_parameters(run_trial, shared=shared), {"CPU": 0, "memory": 1})
    if resume:
        tuner = tune.Tuner.restore(str(run_dir / EXPERIMENT), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(settings.search_space),
            tune_config=tune.TuneConfig(
                metric=settings.metric,
                mode=settings.mode,
                num_samples=settings.num_samples,
                search_alg=search_algorithm(settings, cfg.seed),
                scheduler=trial_scheduler,
                max_concurrent_trials=settings.max_concurrent_trials or concurrent_trials(cfg, ray.cluster_resources()),
                time_budget_s=settings.time_budget_s,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=EXPERIMENT,
                storage_path=str(run_dir),
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                callbacks=[callback],
                verbose=1,
            ),
        )
    results = tuner.fit()
    return _finish(cfg, run_dir, results, worker_data, log)


def _evaluations_per_trial(cfg: ExperimentConfig, n_train: int) -> int:
    from raytune_ft.train.batches import StepPlan

    plan = StepPlan(
        n_train,
        cfg.train.batch_size,
        cfg.scaling.num_workers,
        cfg.train.grad_accum,
        cfg.train.epochs,
        cfg.train.max_steps,
        cfg.seed,
    )
    every = cfg.train.eval_every_steps or plan.steps_per_epoch
    return max(1, math.ceil(plan.total_steps / max(1, every)))


def _callback(run_dir: Path, settings: Any, trial_scheduler: Any) -> Any:
    from ray import tune

    log = ExperimentLog(run_dir, settings.keep_checkpoints, settings.metric, settings.mode, trial_scheduler)

    class Callback(tune.Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            log.on_trial_result(trials, trial, result)

    return Callback()


def _finish(
    cfg: ExperimentConfig, run_dir: Path, results: Any, worker_data: dict[str, Any], log: Callable[[str], None]
) -> TuneRun:
    from raytune_ft.train.trainer import export_prepared
    from raytune_ft.tune.winner import test_metrics

    settings = cfg.tune
    assert settings is not None
    trials = trial_rows(results, settings.metric, settings.mode)
    write_trials_csv(run_dir / "trials.csv", trials, settings.search_space)
    ok = [r for r in results if r.error is None or r.metrics]
    if not ok:
        raise RuntimeError(f"every trial failed; see {run_dir / EXPERIMENT}")
    # Best on the validation metric only, over every report of every trial.
    best = results.get_best_result(settings.metric, settings.mode, scope="all")
    checkpoint = best.get_best_checkpoint(settings.metric, settings.mode)
    if checkpoint is None:
        raise RuntimeError(f"the best trial ({best.path}) left no checkpoint")
    trial_id = Path(best.path).name
    best_cfg = trial_experiment(cfg.model_dump(mode="json", by_alias=True), best.config, cfg.name)
    log(f"winner: {trial_id} {best.config}; exporting {checkpoint.path}")
    with checkpoint.as_directory() as local:
        winner = export_prepared(Path(local), best_cfg, run_dir / "winner", worker_data)
    log("evaluating the winner once on the test split")
    tested = test_metrics(winner, best_cfg, worker_data["data_dir"], worker_data["classes"])
    (winner / "test_metrics.json").write_text(json.dumps(tested, indent=2) + "\n")
    best_metrics = next((m for c, m in best.best_checkpoints if c.path == checkpoint.path), best.metrics)
    return TuneRun(run_dir, trial_id, dict(best.config), dict(best_metrics), winner, tested, trials)


def trial_rows(results: Any, metric: str, mode: str) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        history = result.metrics_dataframe
        values = history[metric].dropna().tolist() if history is not None and metric in history else []
        best = (max(values) if mode == "max" else min(values)) if values else None
        rows.append(
            {
                "trial": Path(result.path).name,
                "status": "ERROR" if result.error else "TERMINATED",
                "config": dict(result.config or {}),
                f"best_{metric}": best,
                "iterations": (result.metrics or {}).get("training_iteration"),
                "last_step": (result.metrics or {}).get("step"),
                "error": str(result.error).splitlines()[0][:200] if result.error else "",
            }
        )
    return sorted(rows, key=lambda r: r["trial"])


def write_trials_csv(path: Path, rows: list[dict[str, Any]], space: dict[str, Any]) -> None:
    if not rows:
        return
    keys = list(space)
    fields = ["trial", "status", *keys, *[k for k in rows[0] if k not in ("trial", "status", "config")]]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            flat = {k: v for k, v in row.items() if k != "config"}
            flat.update({k: row["config"].get(k) for k in keys})
            writer.writerow(flat)
