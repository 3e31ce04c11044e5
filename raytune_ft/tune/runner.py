"""`raytune-ft tune`: Ray Tune around the training engine, then one winner exported and tested once.

RUN_DIR layout: config.yaml (resolved), trials.csv, trials/ (Ray Tune's experiment: trial folders with
progress.csv, result.json and TensorBoard events, checkpoints, pbt_policy_*.txt), train-runs/ (each trial's Ray
Train runs), mlflow.db (the default MLflow store), exploits.jsonl (PBT/PB2), winner/ (the export, with
test_metrics.json and for PBT/PB2 pbt_policy.txt, the schedule `raytune-ft tune --replay` re-runs), replays/.
With `tune.storage_path` set, trials/ and train-runs/ live there instead.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyarrow.fs import FileSelector, FileType

from raytune_ft.config import ExperimentConfig, config_to_yaml
from raytune_ft.config.algorithms import perturbs
from raytune_ft.errors import RaytuneFtError
from raytune_ft.layout import CONFIG_FILE, TEST_METRICS
from raytune_ft.train.ray_cluster import remove_leftover_placement_groups
from raytune_ft.train.storage import bytes_needed, check_storage
from raytune_ft.tune.search import RestartsClean, require_extra, scheduler, search_algorithm, tuner_space
from raytune_ft.tune.space import trial_experiment
from raytune_ft.tune.trial import (
    EXPLOIT_KEY,
    HP_PREFIX,
    credentials_stay_in_the_environment,
    filesystem_of,
    is_local,
    run_trial,
)

EXPERIMENT = "trials"
TRIAL_LOGS = ("progress.csv", "result.json")  # what Tune's CSV and JSON loggers write per trial


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
    return cfg.run_dir / "tune"


def concurrent_trials(cfg: ExperimentConfig, cluster: dict[str, float]) -> int | None:
    """Trials that fit side by side: each is a Ray Train run holding its workers' CPUs (and GPUs). On a cluster
    joined by address there is no cap (None): what it holds now says nothing of what its autoscaler can add, and
    trials that wait for workers are the demand that makes it add nodes."""
    if cfg.cluster.address is not None:
        return None
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
        self.trials: list[Any] = []  # Tune's own list of the search's trials, as its callbacks receive it
        self.saved: list[set[str]] = []  # each trial's latest checkpoint when Tune last saved its state, and before

    def state_saved(self) -> None:
        """Tune has just written its experiment state (the trials with their latest checkpoints), the state that
        `tune --resume` restores after a crash: pin those checkpoints until the next save, and one save longer
        in case the driver dies while writing it. Without this, a driver killed a few reports after a save left
        a state that named a checkpoint since pruned, and the resumed trial failed."""
        latest = {t.checkpoint.path for t in self.trials if t.checkpoint is not None}
        self.saved = [*self.saved[-1:], latest]

    def on_trial_result(self, trials: list[Any], trial: Any, result: dict[str, Any]) -> dict[str, Any] | None:
        """Log RESULT; the exploit it reports first, if any, as exploits.jsonl's line."""
        exploit = None
        record = result.get(EXPLOIT_KEY)
        # one line per exploit: a trial resumed before its first report after one restores the same donor again
        key = (trial.trial_id, record and record.get("donor_checkpoint"))
        if record and record.get("exploit") and key not in self.logged:
            self.logged.add(key)
            line = {
                "trial": trial.trial_id,
                "donor": record["donor"],
                "donor_step": record["donor_step"],
                "donor_checkpoint": record["donor_checkpoint"],
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
            exploit = line
        # the config this result was trained with: PBT may already have replaced trial.config for the next run
        self.last_config[trial.trial_id] = dict(result.get("config") or trial.config)
        # the folder this result's checkpoint went to, as Tune names it in the result itself
        folder = result.get("checkpoint_dir_name")
        if folder and trial.path and self.metric in result:
            self.scores[f"{trial.path.rstrip('/')}/{folder}"] = float(result[self.metric])
        self.prune(trials)
        return exploit

    @staticmethod
    def on_trial_start(trial: Any) -> None:
        """Tune's CSV and JSON loggers, when a trial restarts from a checkpoint (PBT exploit, replay switch,
        retry), copy progress.csv and result.json from storage over the driver's copy; storage is synced from
        the driver only every few minutes, so the reports since the last sync were lost (seen: a PB2 trial's
        result.json left empty, a replay missing its step-8 and step-16 reports). Upload the driver's copy
        first, so that the copy back is the whole log. Runs before the loggers: user callbacks come first."""
        if trial.checkpoint is None or not trial.local_path:
            return
        import pyarrow.fs

        for name in TRIAL_LOGS:
            local = Path(trial.local_path) / name
            if local.is_file() and local.stat().st_size:
                pyarrow.fs.copy_files(
                    str(local),
                    f"{trial.storage.trial_fs_path}/{name}",
                    destination_filesystem=trial.storage.storage_filesystem,
                )

    def pinned(self, trials: list[Any]) -> set[str]:
        """Checkpoints a pending restore or a PBT exploit may still read, and the ones Tune's own records call a
        trial's latest and best (what a restart restores and what `get_best_checkpoint` returns at the end; a
        paused and restarted trial can write a checkpoint folder name twice, so names alone can mislead)."""
        keep = set()
        sign = -1 if self.mode == "max" else 1
        for t in trials:
            if t.checkpoint is not None and t.status in ("PENDING", "PAUSED"):
                keep.add(t.checkpoint.path)
            manager = getattr(getattr(t, "run_metadata", None), "checkpoint_manager", None)
            if manager is None:
                continue
            if manager.latest_checkpoint_result is not None:
                keep.add(manager.latest_checkpoint_result.checkpoint.path)
            scored = [r for r in manager.best_checkpoint_results if self.metric in r.metrics]
            if scored:
                keep.add(min(scored, key=lambda r: sign * float(r.metrics[self.metric])).checkpoint.path)
        keep.update(*self.saved)
        for state in getattr(self.pbt, "_trial_state", {}).values():
            last = getattr(state, "last_checkpoint", None)
            if getattr(last, "path", None):
                keep.add(last.path)
        return keep

    def prune(self, trials: list[Any]) -> None:
        pinned = self.pinned(trials)
        sign = -1 if self.mode == "max" else 1
        for t in trials:
            if not t.path:
                continue
            fs = t.storage.storage_filesystem  # local disk or s3/gs alike
            folders = sorted(
                info.path
                for info in fs.get_file_info(FileSelector(t.path, allow_not_found=True))
                if info.type == FileType.Directory and info.base_name.startswith("checkpoint_")
            )
            if len(folders) <= self.keep:
                continue
            newest = set(folders[-self.keep :])
            scored = [f for f in folders if f in self.scores]
            best = {min(scored, key=lambda f: sign * self.scores[f])} if scored else set()
            for folder in folders:
                if folder not in newest | best | pinned:
                    try:
                        fs.delete_dir(folder)
                    except OSError:  # already gone, or another trial's restore holds it open: try next time
                        pass


def tune_experiment(
    cfg: ExperimentConfig,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: Callable[[list[Any], dict[str, Any]], None] | None = None,
) -> TuneRun:
    """PROGRESS, when given, is called on the driver after every trial report with Tune's trials and the report."""
    import ray
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    if cfg.tune is None:
        raise ValueError("the experiment has no tune section")
    settings = cfg.tune
    require_extra(settings.algorithm)
    run_dir = Path(run_dir).resolve() if run_dir else default_run_dir(cfg)
    if (run_dir / "winner" / TEST_METRICS).exists():
        raise FileExistsError(f"{run_dir} already holds a finished search; choose another --run-dir")
    storage = storage_of(cfg, run_dir)
    if not resume and _exists(f"{storage}/{EXPERIMENT}"):
        raise FileExistsError(f"{run_dir} holds an unfinished search: continue it with `raytune-ft tune --resume`")
    if resume and not _exists(f"{storage}/{EXPERIMENT}"):
        raise FileNotFoundError(f"nothing to resume: {storage}/{EXPERIMENT} does not exist")
    local_storage = is_local(storage)
    concurrent = settings.max_concurrent_trials or (2 if cfg.cluster.address is None else 1)
    need = bytes_needed(cfg, concurrent) if local_storage else None
    if local_storage and storage.removeprefix("file://") != str(run_dir):
        check_storage(Path(storage.removeprefix("file://")), need, "tune.storage_path")
        need = None
    check_storage(run_dir, need)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(config_to_yaml(cfg))

    worker_data, trainable = _trainable(cfg, storage, log)
    evaluations = _evaluations_per_trial(cfg, worker_data["data"]["train"])
    trial_scheduler = scheduler(settings, evaluations)
    if resume:
        log(f"resuming the search in {storage}/{EXPERIMENT}")
        tuner = tune.Tuner.restore(f"{storage}/{EXPERIMENT}", trainable, resume_errored=True)
    else:
        at_once = settings.max_concurrent_trials or concurrent_trials(cfg, ray.cluster_resources())
        search = search_algorithm(settings, cfg.seed, at_once)
        tuner = tune.Tuner(
            trainable,
            param_space=tuner_space(settings),
            tune_config=tune.TuneConfig(
                metric=settings.metric,
                mode=settings.mode,
                num_samples=settings.num_samples,
                search_alg=search,
                scheduler=trial_scheduler,
                # a variant generator carries the limit itself (Tune would ignore this one beside it, with a warning)
                max_concurrent_trials=None if isinstance(search, BasicVariantGenerator) else at_once,
                time_budget_s=settings.time_budget_s,
                reuse_actors=False,
            ),
            run_config=_run_config(cfg, run_dir, storage, trial_scheduler, progress),
        )
    with credentials_stay_in_the_environment():
        results = tuner.fit()
    remove_leftover_placement_groups(log)
    return _finish(cfg, run_dir, results, worker_data, log)


def replay_schedule(
    run_dir: Path,
    trial: str | None = None,
    out_dir: Path | None = None,
    *,
    cfg: ExperimentConfig | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Re-run one PBT/PB2 trial's recorded hyper-parameter schedule (Ray's PopulationBasedTrainingReplay): it
    starts from the configuration the trial inherited and switches at the recorded training iterations. The
    result is exported to OUT_DIR/winner; the test split is not read again. CFG: the search's experiment with
    overrides (a cluster to run on); by default RUN_DIR's own."""
    from ray import tune

    from raytune_ft.config import load_config
    from raytune_ft.train.trainer import export_prepared

    run_dir = Path(run_dir).resolve()
    policy = _policy_file(run_dir, trial)
    cfg = cfg or load_config(run_dir / CONFIG_FILE)
    assert cfg.tune is not None
    name = trial or "winner"
    out_dir = Path(out_dir).resolve() if out_dir else run_dir / "replays" / name
    if (out_dir / CONFIG_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds a replay; choose another --run-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(config_to_yaml(cfg))
    shutil.copyfile(policy, out_dir / "pbt_policy.txt")
    storage = f"{cfg.tune.storage_path.rstrip('/')}/replays/{name}" if cfg.tune.storage_path else str(out_dir)
    worker_data, trainable = _trainable(cfg, storage, log)
    log(f"replaying {policy}")
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            num_samples=1,
            scheduler=replay_scheduler(str(policy)),
            reuse_actors=False,
        ),
        run_config=_run_config(cfg, out_dir, storage, None),
    )
    with credentials_stay_in_the_environment():
        results = tuner.fit()
    remove_leftover_placement_groups(log)
    result = results[0]
    if result.error:
        raise SearchError(f"the replay failed: {result.error}")
    checkpoint = result.get_best_checkpoint(cfg.tune.metric, cfg.tune.mode)
    if checkpoint is None:
        raise SearchError(f"the replay ({result.path}) left no checkpoint")
    trials = trial_rows(results, cfg.tune.metric, cfg.tune.mode)
    write_trials(out_dir, trials, {})
    final_cfg = trial_experiment(cfg.model_dump(mode="json", by_alias=True), result.config, cfg.name)
    with checkpoint.as_directory() as local:
        return export_prepared(Path(local), final_cfg, out_dir / "winner", worker_data)


def replay_scheduler(policy: str) -> Any:
    from ray.tune.schedulers import PopulationBasedTrainingReplay

    class ScheduleReplay(RestartsClean, PopulationBasedTrainingReplay):
        pass

    return ScheduleReplay(policy)


def _policy_file(run_dir: Path, trial: str | None) -> Path:
    if trial is None:
        policy = run_dir / "winner" / "pbt_policy.txt"
        if policy.is_file():
            return policy
        if (run_dir / "winner").is_dir():
            raise FileNotFoundError(
                f"{run_dir / 'winner'} has no pbt_policy.txt: the winner never exploited another trial (or the "
                "search was not PBT/PB2), so its schedule is its config; train it with `raytune-ft train`"
            )
        raise FileNotFoundError(f"{run_dir} has no winner/ yet: name a trial with --trial")
    found = sorted(run_dir.glob(f"{EXPERIMENT}/pbt_policy_*{trial}*.txt"))
    if len(found) != 1:
        known = sorted(p.stem.removeprefix("pbt_policy_") for p in run_dir.glob(f"{EXPERIMENT}/pbt_policy_*.txt"))
        raise FileNotFoundError(
            f"no single PBT schedule for trial '{trial}' in {run_dir / EXPERIMENT}; trials that exploited: "
            f"{', '.join(known) or 'none'}"
        )
    return found[0]


def storage_of(cfg: ExperimentConfig, run_dir: Path) -> str:
    """Where trials/ and train-runs/ go: tune.storage_path (a directory or s3://, gs:// URI) or the run directory."""
    assert cfg.tune is not None
    return (cfg.tune.storage_path or str(run_dir)).rstrip("/")


def search_started(cfg: ExperimentConfig, run_dir: Path) -> bool:
    """Whether RUN_DIR's search has begun (Tune's experiment folder exists), finished or not."""
    return _exists(f"{storage_of(cfg, run_dir)}/{EXPERIMENT}")


def _exists(uri: str) -> bool:
    fs, path = filesystem_of(uri)
    return fs.get_file_info(path).type != FileType.NotFound


def _trainable(cfg: ExperimentConfig, storage: str, log: Callable[[str], None]) -> tuple[dict, Any]:
    """The prepared data and the Tune trainable (a trial = one Ray Train run writing under STORAGE)."""
    from ray import tune

    from raytune_ft.train.ray_cluster import ensure_ray
    from raytune_ft.train.trainer import loop_data, prepare_worker_data

    assert cfg.tune is not None
    log("preparing data")
    worker_data = prepare_worker_data(cfg)
    ensure_ray(cfg)
    shared = {
        "experiment": cfg.model_dump(mode="json", by_alias=True),
        "train_storage": f"{storage}/train-runs",
        "trials_dir": f"{storage}/{EXPERIMENT}",  # each trial's result.json: what the driver received
        # PBT/PB2 (and their replay) would exploit at a trial's last report into a restart with nothing left to
        # train; marked `done`, that report ends the trial. Other schedulers and searchers must see it as a
        # result (HyperBandForBOHB and TuneBOHB take the full-budget result only from on_trial_result).
        "end_at_last_report": perturbs(cfg.tune.algorithm),
        # A resumed trial goes on from the checkpoint Tune saved with it, not from a newer one on disk, when the
        # scheduler's saved state must agree with it: PBT/PB2 (search.SavedSchedule). From a newer one, the quick
        # example killed as both trials reached step 16 resumed them from 16, while the schedule saved with the
        # experiment had them at 8: their next report was the last, and the perturbation at 16 never happened.
        "newer_own_checkpoint": not perturbs(cfg.tune.algorithm),
        "loop_config": loop_data(worker_data),
    }
    # The trial function only waits on its Ray Train run, whose workers hold the CPUs/GPUs. Tune refuses an empty
    # request, and even 0.01 CPU per trial would leave N trials' workers N x 0.01 CPU short: ask for 1 byte instead.
    trainable = tune.with_resources(tune.with_parameters(run_trial, shared=shared), {"CPU": 0, "memory": 1})
    return worker_data, trainable


def _mlflow_callback(uri: str, experiment: str) -> Any:
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class ParamsOnce(MLflowLoggerCallback):
        """Ray's callback logs a trial's config again whenever the trial restarts; after a PBT exploit the values
        differ and MLflow refuses to change a param, which aborts Tuner.fit. Params are the starting config here;
        the values each report trained with are its hp/ metrics."""

        def log_trial_start(self, trial: Any) -> None:
            if trial not in self._trial_runs:
                super().log_trial_start(trial)

    return ParamsOnce(tracking_uri=uri, experiment_name=experiment, save_artifact=False)


def _run_config(
    cfg: ExperimentConfig, run_dir: Path, storage: str, trial_scheduler: Any, progress: Callable | None = None
) -> Any:
    from ray import tune

    settings = cfg.tune
    assert settings is not None
    scaling = cfg.scaling
    asks = f"{scaling.num_workers} worker(s) of {scaling.cpus_per_worker:g} CPU" + (
        f" and {scaling.gpus_per_worker or 1:g} GPU" if scaling.use_gpu else ""
    )
    stall = StallWatch(cfg.stall_deadline_s, asks)
    callbacks = [_callback(run_dir, settings, trial_scheduler, stall, progress)]
    if settings.mlflow:
        # MLflow 3's plain file store refuses to start (and would abort Tuner.fit); a SQLite file needs no server
        uri = settings.mlflow_tracking_uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        callbacks.append(_mlflow_callback(uri, cfg.name))
    # Ray adds its CSV, JSON and TensorBoard loggers beside these (progress.csv, result.json, events.out.tfevents)
    return tune.RunConfig(
        name=EXPERIMENT,
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=settings.max_failures),
        callbacks=callbacks,
        stop=ForgettingStop(settings.max_forgetting) if settings.max_forgetting is not None else None,
        verbose=1,
    )


class ForgettingStop:
    """Tune's stop criterion for tune.max_forgetting: a trial whose retain-set metric got worse than the limit
    (eval_retain_worse_by, measured against the model before its first step) stops there."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        worse = result.get("eval_retain_worse_by")
        return worse is not None and worse > self.limit


def _evaluations_per_trial(cfg: ExperimentConfig, train: dict[str, list]) -> int:
    from raytune_ft.train.batches import StepPlan

    plan = StepPlan.of(cfg, train, cfg.scaling.num_workers)
    every = cfg.train.eval_every_steps or plan.steps_per_epoch
    return max(1, math.ceil(plan.total_steps / max(1, every)))


class SearchError(RaytuneFtError, RuntimeError):
    """A search or replay that ended without a model to export: every trial failed, or none left a checkpoint."""


class SearchStalled(RaytuneFtError, RuntimeError):
    """No trial of a search has run for tune.stall_timeout_s."""


class StallWatch:
    """Ends a search in which no trial has run for LIMIT_S seconds with an error that names the waiting trials and
    what they ask for. Tune itself only prints, every minute, that no trial is running (a synchronous PBT search
    resumed with Ray's own scheduler printed it for 9 minutes, until it was stopped by hand)."""

    def __init__(self, limit_s: float, asks: str) -> None:
        self.limit_s, self.asks = limit_s, asks
        self.since: float | None = None

    def check(self, trials: list[Any], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        waiting = [t for t in trials if t.status in ("PENDING", "PAUSED")]
        if not waiting or any(t.status == "RUNNING" for t in trials):
            self.since = None
            return
        self.since = now if self.since is None else self.since
        if now - self.since > self.limit_s:
            raise SearchStalled(self.message(waiting, now - self.since))

    def message(self, waiting: list[Any], waited: float) -> str:
        import ray

        def where(trial: Any) -> str:
            step = (trial.last_result or {}).get("step")
            return f"{trial.trial_id} {trial.status}" + (f" at step {step}" if step is not None else "")

        free = (
            {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")} if ray.is_initialized() else {}
        )
        trial_asks = {k: v for k, v in waiting[0].placement_group_factory.required_resources.items() if v}
        paused = [t for t in waiting if t.status == "PAUSED"]
        lines = [
            f"no trial of the search has run for {waited:.0f} s (tune.stall_timeout_s = {self.limit_s:g} s); "
            f"waiting: {', '.join(where(t) for t in waiting)}. Each trial asks for {trial_asks} for itself and "
            f"{self.asks} for its training run" + (f"; the cluster has {free} free." if free else ".")
        ]
        if paused and len(paused) == len(waiting):
            lines.append(
                "Only the scheduler resumes a paused trial (synchronous PBT/PB2: once every trial has reached the "
                "perturbation point), and it chose none."
            )
        lines.append(
            "The search's state is saved: once the cause is fixed, continue it with `raytune-ft tune --resume "
            "RUN_DIR` (a larger tune.stall_timeout_s if the trials only needed longer)."
        )
        return " ".join(lines)


def _callback(
    run_dir: Path, settings: Any, trial_scheduler: Any, stall: StallWatch, progress: Callable | None = None
) -> Any:
    from ray import tune

    log = ExperimentLog(run_dir, settings.keep_checkpoints, settings.metric, settings.mode, trial_scheduler)
    # a progress display may also say when a trial ends or exploits another (run.TuneProgress)
    ended = getattr(progress, "ended", None) or (lambda trial, status: None)
    exploited = getattr(progress, "exploited", None) or (lambda exploit: None)

    class Callback(tune.Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            exploit = log.on_trial_result(trials, trial, result)
            if exploit is not None:
                exploited(exploit)
            if progress is not None:
                progress(trials, result)

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            log.trials = trials

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            stall.check(trials)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log.on_trial_start(trial)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            ended(trial, "finished")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            ended(trial, f"failed (see error.txt in {getattr(trial, 'path', None) or 'its trial folder'})")

        def get_state(self) -> dict[str, Any] | None:
            # Tune asks its callbacks for their state each time it saves the experiment's, right after the trials
            log.state_saved()
            state = {"last_config": log.last_config, "scores": log.scores, "logged": log.logged}
            saved = getattr(trial_scheduler, "saved_state", None)  # PBT/PB2: search.SavedSchedule
            return {**state, "scheduler": saved()} if saved else state

        def set_state(self, state: dict[str, Any]) -> None:
            log.last_config, log.scores, log.logged = state["last_config"], state["scores"], state["logged"]
            if "scheduler" in state:
                trial_scheduler.restore_saved_state(state["scheduler"])

    return Callback()


def _finish(
    cfg: ExperimentConfig, run_dir: Path, results: Any, worker_data: dict[str, Any], log: Callable[[str], None]
) -> TuneRun:
    from raytune_ft.train.trainer import export_prepared
    from raytune_ft.tune.winner import test_metrics

    settings = cfg.tune
    assert settings is not None
    trials = trial_rows(results, settings.metric, settings.mode)
    write_trials(run_dir, trials, settings.search_space)
    ok = [r for r in results if r.error is None or r.metrics]
    if not ok:
        raise SearchError(f"every trial failed; see {run_dir / EXPERIMENT}")
    # Best on the validation metric only, over every report of every trial.
    best = results.get_best_result(settings.metric, settings.mode, scope="all")
    checkpoint = best.get_best_checkpoint(settings.metric, settings.mode)
    if checkpoint is None:
        raise SearchError(f"the best trial ({best.path}) left no checkpoint")
    trial_id = Path(best.path).name
    best_metrics = next((m for c, m in best.best_checkpoints if c.path == checkpoint.path), best.metrics)
    # the config that checkpoint was trained with: a PBT trial's final config may be one it never trained with
    trained_with = dict(best_metrics.get("config") or best.config)
    best_cfg = trial_experiment(cfg.model_dump(mode="json", by_alias=True), trained_with, cfg.name)
    log(f"winner: {trial_id} {trained_with}; exporting {checkpoint.path}")
    with checkpoint.as_directory() as local:
        winner = export_prepared(Path(local), best_cfg, run_dir / "winner", worker_data)
    _keep_schedule(best, winner)
    log("evaluating the winner once on the test split")
    tested = test_metrics(winner, best_cfg, worker_data["data_dir"], worker_data["classes"])
    (winner / TEST_METRICS).write_text(json.dumps(tested, indent=2) + "\n")
    from raytune_ft.modelcard import write_model_card

    write_model_card(winner)  # now with the test metrics and the PBT schedule
    return TuneRun(run_dir, trial_id, trained_with, dict(best_metrics), winner, tested, trials)


def _keep_schedule(best: Any, winner: Path) -> None:
    """PBT/PB2 write each trial's schedule to pbt_policy_<trial_id>.txt beside the trial folders; the winner keeps
    a copy (what `tune --replay` re-runs) and a readable schedule.json."""
    trial_id = trial_id_of(Path(best.path).name)  # not best.metrics: after an exploit it can name the donor
    experiment = str(best.path).rsplit("/", 1)[0]
    source = f"{experiment}/pbt_policy_{trial_id}.txt"
    fs = best.filesystem or filesystem_of(experiment)[0]
    if trial_id is None or fs.get_file_info(source).type == FileType.NotFound:
        return
    with fs.open_input_stream(source) as fh:
        text = fh.read().decode()
    (winner / "pbt_policy.txt").write_text(text)
    (winner / "schedule.json").write_text(json.dumps(schedule(text), indent=2) + "\n")


def schedule(policy_text: str) -> list[dict[str, Any]]:
    """The configs one PBT trial trained with, read as Ray's replay reads a policy: walking back from the last
    exploit along the chain of donors. Each entry is [from training iteration, config]."""
    rows = [json.loads(line) for line in policy_text.splitlines() if line.strip()]
    changes: list[dict[str, Any]] = []
    start_config = None
    last_donor = None
    for target_tag, donor_tag, _target_iter, donor_iter, donor_config, new_config in reversed(rows):
        if last_donor is not None and target_tag != last_donor:
            break  # the chain was overwritten by a later exploit
        last_donor, start_config = donor_tag, donor_config
        changes.append({"from_iteration": donor_iter, "config": new_config, "inherited_from": donor_tag})
    return [{"from_iteration": 0, "config": start_config}, *reversed(changes)] if changes else []


def trial_rows(results: Any, metric: str, mode: str) -> list[dict[str, Any]]:
    """One row per trial. `config` is what the trial trained with at its best report (PBT changes it on the way);
    STOPPED marks a trial that ended before its planned steps (a scheduler stopped it, or early stopping)."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        scored = history.dropna(subset=[metric]) if history is not None and metric in history else None
        best_row = None
        if scored is not None and len(scored):
            best_row = scored.loc[scored[metric].idxmax() if mode == "max" else scored[metric].idxmin()]
        config = dict(result.config or {})
        if best_row is not None:
            config.update({k[len(HP_PREFIX) :]: v for k, v in best_row.items() if k.startswith(HP_PREFIX)})
        last = result.metrics or {}
        stopped = last.get("step") is not None and last.get("step", 0) < last.get("total_steps", 0)
        status = "ERROR" if result.error else "STOPPED" if stopped else "TERMINATED"
        rows.append(
            {
                "trial": Path(result.path).name,
                "trial_id": trial_id_of(Path(result.path).name) or last.get("trial_id", ""),
                "status": status,
                "config": config,
                f"best_{metric}": None if best_row is None else float(best_row[metric]),
                "best_step": None if best_row is None else best_row.get("step"),
                "iterations": last.get("training_iteration"),
                "last_step": last.get("step"),
                "error": root_cause(result.error) if result.error else "",
            }
        )
    return sorted(rows, key=lambda r: r["trial"])


def trial_id_of(folder: str) -> str | None:
    """run_trial_<id>_<n>_...: ids are <hex>_<5 digits> from Tune's variant generator, 8 hex digits from searchers."""
    found = re.match(r"^run_trial_([0-9a-f]+(?:_\d{5})?)_\d+_", folder)
    return found.group(1) if found else None


def root_cause(error: BaseException) -> str:
    """The line that says what went wrong: Ray wraps a worker's exception in several layers of its own."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*:( |$)", line)]
    cause = causes[-1] if causes else lines[0] if lines else type(error).__name__
    if cause.endswith(":"):  # Ray Train's "failed due to worker errors:" heads what happened to the worker
        after = lines[len(lines) - 1 - lines[::-1].index(cause) :]
        told = [
            line.split(". ")[0].rstrip(".") + "." for line in after if re.match(r"^(A worker|The actor is dead)", line)
        ]
        cause = " ".join([cause, *told])
    return cause[:300]


def write_trials(run_dir: Path, rows: list[dict[str, Any]], space: dict[str, Any]) -> None:
    """trials.csv and trials.parquet: one row per trial, a column per search-space key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        return
    keys = list(space)
    fields = ["trial", "status", *keys, *[k for k in rows[0] if k not in ("trial", "status", "config")]]
    flat_rows = []
    for row in rows:
        flat = {k: v for k, v in row.items() if k != "config"}
        flat.update({k: row["config"].get(k) for k in keys})
        flat_rows.append({k: flat.get(k) for k in fields})
    with open(run_dir / "trials.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat_rows)
    columns = {}
    for field in fields:
        values = [r[field] for r in flat_rows]
        try:
            columns[field] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # a choice of mixed types: keep it readable as text
            columns[field] = pa.array([None if v is None else str(v) for v in values])
    pq.write_table(pa.table(columns), run_dir / "trials.parquet")
