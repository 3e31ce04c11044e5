"""Search algorithm and trial scheduler for `tune.algorithm` / `tune.scheduler`; each search library is an
optional extra, named in the error when it is missing."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from raytune_ft.config.algorithms import ALGORITHMS
from raytune_ft.config.schema import GridDim, TuneConfig
from raytune_ft.errors import InputError
from raytune_ft.tune.space import DefineByRun, param_space, pb2_bounds, tune_domain

logger = logging.getLogger(__name__)

# Training progress is counted in optimizer steps (every report carries `step`), not in reports.
TIME_ATTR = "step"


class MissingExtraError(InputError, RuntimeError):
    pass


def require_extra(algorithm: str) -> None:
    if ALGORITHMS[algorithm].extra is None:
        return
    extra, modules = ALGORITHMS[algorithm].extra
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"tune.algorithm '{algorithm}' needs {', '.join(missing)}: pip install 'raytune_ft[{extra}]'"
        )


def mutation(dim: Any) -> Any:
    """PBT resamples from a distribution: grid values (Tune's {"grid_search": [...]}) become a choice."""
    from ray import tune

    return tune.choice(dim.values) if isinstance(dim, GridDim) else tune_domain(dim)


def searcher_holds_space(tune: TuneConfig) -> bool:
    return tune.algorithm == "optuna" and any(getattr(d, "when", None) for d in tune.search_space.values())


def tuner_space(tune: TuneConfig) -> dict[str, Any]:
    """The Tuner's param_space: empty when the searcher defines the space itself."""
    return {} if searcher_holds_space(tune) else param_space(tune.search_space)


def search_algorithm(tune: TuneConfig, seed: int, max_concurrent: int | None = None) -> Any:
    """Random, grid, PBT and PB2 sample param_space with Tune's own variant generator, seeded by the experiment's
    seed so that a rerun starts from the same points. It must carry MAX_CONCURRENT itself: Tune ignores
    `max_concurrent_trials` when it is handed a variant generator."""
    require_extra(tune.algorithm)
    if tune.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(seed=seed)
        if searcher_holds_space(tune):
            # conditional keys: the searcher holds the space as code, and the Tuner's param_space stays empty
            return OptunaSearch(DefineByRun(tune.search_space), metric=tune.metric, mode=tune.mode, sampler=sampler)
        return OptunaSearch(sampler=sampler)
    if tune.algorithm == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=seed, n_initial_points=max(2, tune.num_samples // 4))
    if tune.algorithm == "bohb":
        from ray.tune.search.bohb import TuneBOHB

        return TuneBOHB(seed=seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent or 0)


class RestartsClean:
    """Mixed into PBT, PB2 and their replay: a trial they start again begins without a decision Tune cached for
    the run it replaces.

    Tune caches a STOP for a trial that is stopped while a save is pending, to apply once the save is processed.
    PBT and the replay stop (pause) a trial that way: PBT when it exploits a trial whose pause-save is still in
    flight (synch mode: the other trials reached the perturbation point meanwhile), the replay on every switch.
    Nothing clears that STOP, so the restarted trial was stopped at its next checkpoint (seen: a trial that
    exploited at step 8 of 16 ended at step 12, marked STOPPED; replays ending at step 12 of 16)."""

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        trial = super().choose_trial_to_run(tune_controller)
        if trial is not None:
            controller = getattr(tune_controller, "_tune_controller", tune_controller)
            controller._cached_trial_decisions.pop(trial.trial_id, None)
        return trial


PB2_STATE = ("data", "current", "last_exploration_time")  # PB2's own, beside PBT's: its model's observations


class SavedSchedule:
    """Mixed into PBT and PB2: their state is saved with the experiment's and comes back with `tune --resume`.

    Tune saves neither scheduler: Tuner.restore brings back the object pickled when the search began, for which no
    trial had reached a perturbation point. A synchronous search resumed that way hung: both trials reached the
    next point (step 16 of the quick example), were perturbed as if at the first one, and the next point was set
    to the step where both stood, which no paused trial is below, so none was ever resumed (Ray: "Tuner.restore
    doesn't restore schedulers properly", ray-project/ray#30838, open; the hang itself: the unmerged #48616). The
    runner's Tune callback saves this state each time Tune saves the experiment's (runner.ExperimentLog)."""

    _restored: dict[str, dict[str, Any]] | None = None  # per trial id, until the restored trial is added
    _logs_back = False

    def saved_state(self) -> dict[str, Any]:
        trials = {}
        for trial, state in self._trial_state.items():
            trials[trial.trial_id] = {
                "last_score": state.last_score,
                "last_train_time": state.last_train_time,
                "last_perturbation_time": state.last_perturbation_time,
                "last_result": state.last_result,
                # a save still in flight has no path yet: that trial is no donor until its next perturbation
                "last_checkpoint": getattr(state.last_checkpoint, "path", None),
            }
        own = {name: getattr(self, name) for name in PB2_STATE if hasattr(self, name)}
        counts = (self._num_checkpoints, self._num_perturbations)
        return {"next_sync": self._next_perturbation_sync, "counts": counts, "trials": trials, "pb2": own}

    def restore_saved_state(self, saved: dict[str, Any]) -> None:
        self._next_perturbation_sync = saved["next_sync"]
        self._num_checkpoints, self._num_perturbations = saved["counts"]
        for name, value in saved["pb2"].items():
            setattr(self, name, value)
        self._restored = dict(saved["trials"])

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        if self._restored is not None and not self._logs_back:
            self._logs_back = True
            policy_logs_back(trial.storage)
        saved = (self._restored or {}).pop(trial.trial_id, None)
        if saved is None:
            return
        from ray.tune import Checkpoint

        state = self._trial_state[trial]
        path = saved.pop("last_checkpoint")
        for name, value in saved.items():
            setattr(state, name, value)
        if path:
            state.last_checkpoint = Checkpoint(path, filesystem=trial.storage.storage_filesystem)
        if self._synch and trial.status == "PENDING" and state.last_train_time >= self._next_perturbation_sync:
            # it was paused at the next perturbation point, waiting for the others: it waits again (Tune starts
            # every PENDING trial it restores, and this one would train past the point without its perturbation)
            trial.set_status("PAUSED")

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        """Ray's synchronous mode resumes a paused trial only below the next perturbation point, which it sets to
        the furthest trial's step when that is further than one interval on. When every trial stands there (their
        reports fall between perturbation points, or a search was resumed from an older state) none is below it
        and none would run again: move the point one interval past them."""
        trial = super().choose_trial_to_run(tune_controller)
        if trial is not None or not self._synch:
            return trial
        trials = tune_controller.get_trials()
        paused = [t for t in trials if t.status == "PAUSED"]
        if not paused or any(t.status in ("RUNNING", "PENDING") for t in trials):
            return None
        furthest = max(self._trial_state[t].last_train_time for t in paused)
        logger.warning(
            "synchronous %s: every unfinished trial waits at step %s or beyond, none below the next perturbation "
            "point (%s); moving it to %s",
            type(self).__name__,
            furthest,
            self._next_perturbation_sync,
            furthest + self._perturbation_interval,
        )
        self._next_perturbation_sync = furthest + self._perturbation_interval
        return super().choose_trial_to_run(tune_controller)


def policy_logs_back(storage: Any) -> None:
    """PBT appends every exploit to pbt_global.txt and pbt_policy_<trial>.txt in the driver's staging folder, which
    Tune copies to the experiment's storage. A resumed driver gets a new staging folder (a new Ray session's, on
    an embedded Ray), Tune copies back only its .json and .pkl files, and its next copy replaced the logs in
    storage with the resumed driver's alone: the winner's schedule (pbt_policy.txt, `tune --replay`) lost every
    exploit before the kill. Bring them back before any trial runs."""
    from pyarrow.fs import FileSelector, copy_files

    fs, staging = storage.storage_filesystem, Path(storage.experiment_driver_staging_path)
    for info in fs.get_file_info(FileSelector(storage.experiment_fs_path, allow_not_found=True)):
        name = info.base_name
        if name.startswith("pbt_") and name.endswith(".txt") and not (staging / name).exists():
            staging.mkdir(parents=True, exist_ok=True)
            copy_files(info.path, str(staging / name), source_filesystem=fs)


def scheduler(tune: TuneConfig, max_reports: int) -> Any:
    """metric and mode are given to the Tuner, not here (Tune refuses them in both places)."""
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        HyperBandForBOHB,
        HyperBandScheduler,
        MedianStoppingRule,
        PopulationBasedTraining,
    )

    if tune.algorithm == "pbt":

        class PBT(RestartsClean, SavedSchedule, PopulationBasedTraining):
            pass

        return PBT(
            time_attr=TIME_ATTR,
            perturbation_interval=tune.perturbation_interval,
            hyperparam_mutations={key: mutation(dim) for key, dim in tune.search_space.items()},
            quantile_fraction=tune.quantile_fraction,
            resample_probability=tune.resample_probability,
            perturbation_factors=tuple(tune.perturbation_factors),
            synch=tune.synch,
        )
    if tune.algorithm == "pb2":
        from ray.tune.schedulers.pb2 import PB2 as RayPB2

        class PB2(RestartsClean, SavedSchedule, RayPB2):
            pass

        return PB2(
            time_attr=TIME_ATTR,
            perturbation_interval=tune.perturbation_interval,
            hyperparam_bounds=pb2_bounds(tune.search_space),
            quantile_fraction=tune.quantile_fraction,
            synch=tune.synch,
        )
    if tune.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration", grace_period=tune.grace_period, reduction_factor=tune.reduction_factor
        )
    if tune.scheduler == "hyperband":
        cls = HyperBandForBOHB if tune.algorithm == "bohb" else HyperBandScheduler
        return cls(time_attr="training_iteration", max_t=max(1, max_reports), reduction_factor=tune.reduction_factor)
    if tune.scheduler == "median":
        return MedianStoppingRule(time_attr="training_iteration", grace_period=tune.grace_period)
    return FIFOScheduler()
