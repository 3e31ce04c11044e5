"""Hyper-parameter search with Ray Tune around the training engine."""

from raytune_ft.tune.runner import TuneRun, default_run_dir, replay_schedule, tune_experiment
from raytune_ft.tune.search import MissingExtraError

__all__ = ["MissingExtraError", "TuneRun", "default_run_dir", "replay_schedule", "tune_experiment"]
