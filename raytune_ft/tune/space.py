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
    """Flat dotted keys (`train.lr`), the names every search library and the trials table show. A conditional
    key (`when`) is a `sample_from` that Tune resolves after the keys it depends on, None when it does not apply."""
    from ray import tune

    def conditional(dim: SearchDim) -> Any:
        domain = tune_domain(dim)
        return tune.sample_from(lambda spec: domain.sample() if applies(dim, spec.config) else None)

    return {key: conditional(dim) if getattr(dim, "when", None) else tune_domain(dim) for key, dim in space.items()}


def applies(dim: SearchDim, chosen: Any) -> bool:
    return all(chosen[key] == value for key, value in (getattr(dim, "when", None) or {}).items())


class DefineByRun:
    """The search space as Optuna code: conditional keys are suggested only when their condition holds, so TPE
    models them only on the trials where they exist. A class, not a closure: OptunaSearch pickles its space into
    Tune's experiment state."""

    def __init__(self, space: dict[str, SearchDim]) -> None:
        # unconditional keys first, so that every condition can be decided when its key comes up
        self.space = sorted(space.items(), key=lambda item: bool(getattr(item[1], "when", None)))

    def __call__(self, trial: Any) -> None:
        chosen: dict[str, Any] = {}
        for key, dim in self.space:
            if not applies(dim, chosen):
                continue
            if isinstance(dim, (UniformDim, LogUniformDim)):
                chosen[key] = trial.suggest_float(key, dim.low, dim.high, log=isinstance(dim, LogUniformDim))
            elif isinstance(dim, IntDim):
                chosen[key] = trial.suggest_int(key, dim.low, dim.high, log=dim.log)
            else:
                chosen[key] = trial.suggest_categorical(key, dim.values)


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
        if value is None:  # a conditional key whose condition did not hold: the experiment's own value stays
            continue
        set_dotted(raw, key, value.item() if hasattr(value, "item") else value)  # numpy scalars from samplers
    raw["name"] = name
    return ExperimentConfig.model_validate(raw)
