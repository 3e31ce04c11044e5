"""The YAML search space as Ray Tune domains, and a trial's sampled values applied to the experiment config."""

from __future__ import annotations

import copy
from typing import Any

from raytune_ft.config import ExperimentConfig
from raytune_ft.config.schema import ChoiceDim, GridDim, IntDim, LogUniformDim, SearchDim, UniformDim


def tune_domain(dim: SearchDim) -> Any:
    from ray import tune

    if isinstance(dim, UniformDim):
        return tune.uniform(dim.low, dim.high)
    if isinstance(dim, LogUniformDim):
        return tune.loguniform(dim.low, dim.high)
    if isinstance(dim, IntDim):  # both ends included, as written in the YAML
        return tune.lograndint(dim.low, dim.high + 1) if dim.log else tune.randint(dim.low, dim.high + 1)
    if isinstance(dim, ChoiceDim):
        return tune.choice(dim.values)
    if isinstance(dim, GridDim):
        return tune.grid_search(dim.values)
    raise TypeError(f"unknown search dimension {dim!r}")


def param_space(space: dict[str, SearchDim]) -> dict[str, Any]:
    """Flat dotted keys (`train.lr`), the names every search library and the trials table show."""
    return {key: tune_domain(dim) for key, dim in space.items()}


def pb2_bounds(space: dict[str, SearchDim]) -> dict[str, list[float]]:
    return {
        key: [dim.low, dim.high] for key, dim in space.items() if isinstance(dim, (UniformDim, LogUniformDim, IntDim))
    }


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def trial_experiment(base: dict[str, Any], values: dict[str, Any], name: str) -> ExperimentConfig:
    """The experiment one trial trains: the base config (as `model_dump(mode="json", by_alias=True)`) with the
    trial's sampled values set, validated like the YAML."""
    raw = copy.deepcopy(base)
    for key, value in values.items():
        set_dotted(raw, key, value.item() if hasattr(value, "item") else value)  # numpy scalars from samplers
    raw["name"] = name
    return ExperimentConfig.model_validate(raw)
