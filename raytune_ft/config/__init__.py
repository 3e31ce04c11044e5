"""Experiment config: the typed schema of the YAML, its loader and its cross-field checks."""

from raytune_ft.config.loader import ConfigError, ConfigIssue, config_to_yaml, load_config, parse_override
from raytune_ft.config.schema import ExperimentConfig

__all__ = ["ConfigError", "ConfigIssue", "ExperimentConfig", "config_to_yaml", "load_config", "parse_override"]
