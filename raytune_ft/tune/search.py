"""Search algorithm and trial scheduler for `tune.algorithm` / `tune.scheduler`; each search library is an
optional extra, named in the error when it is missing."""

from __future__ import annotations

import importlib
from typing import Any

from raytune_ft.config.schema import GridDim, TuneConfig
from raytune_ft.tune.space import DefineByRun, param_space, pb2_bounds, tune_domain

# Training progress is counted in optimizer steps (every report carries `step`), not in reports.
TIME_ATTR = "step"
EXTRAS = {
    "optuna": ("optuna", ["optuna"]),
    "hyperopt": ("hyperopt", ["hyperopt"]),
    "bohb": ("bohb", ["hpbandster", "ConfigSpace"]),
    "pb2": ("pb2", ["sklearn"]),
}


class MissingExtraError(RuntimeError):
    pass


def require_extra(algorithm: str) -> None:
    if algorithm not in EXTRAS:
        return
    extra, modules = EXTRAS[algorithm]
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

        class PBT(RestartsClean, PopulationBasedTraining):
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

        class PB2(RestartsClean, RayPB2):
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
