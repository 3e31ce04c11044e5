"""Hyper-parameter search with Ray Tune around the training engine.

The names below load on first use: Ray Train's controller imports raytune_ft.tune.trial for its report callback,
and it must not pay for Tune's driver side (and torch) to do so."""

from raytune_ft.lazy import exports

_HOMES = {
    "TuneRun": "raytune_ft.tune.runner",
    "default_run_dir": "raytune_ft.tune.runner",
    "replay_schedule": "raytune_ft.tune.runner",
    "tune_experiment": "raytune_ft.tune.runner",
    "MissingExtraError": "raytune_ft.tune.search",
}
__all__ = sorted(_HOMES)

__getattr__ = exports(__name__, _HOMES)
