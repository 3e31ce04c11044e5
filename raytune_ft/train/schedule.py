"""How the learning rate and early stopping follow the steps: each parameter group's learning rate (warmup, the
schedule, gradual unfreezing's gate), this run's values over a loaded checkpoint's, and early stopping's
patience. No Ray, no DeepSpeed."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from raytune_ft.config.schema import ExperimentConfig


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def _group_lambda(step: int, *, label: str, gate: Any, total: int, warmup: int, kind: str) -> float:
    return lr_factor(step, total, warmup, kind) * gate(label, step)


def lr_scheduler(
    optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], gate: Any, total: int, cfg: ExperimentConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Each parameter group's learning rate over TOTAL steps: warmup, then the schedule, times the gradual
    unfreezing GATE of the group's layer."""
    warmup = round(cfg.train.warmup_ratio * total)
    kind = cfg.train.lr_schedule
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [partial(_group_lambda, label=g["group"], gate=gate, total=total, warmup=warmup, kind=kind) for g in groups],
    )


def apply_configured_hyperparameters(scheduler: Any, configured: list[tuple[float, float]]) -> None:
    """After loading a checkpoint, this run's learning rates and weight decay win over the saved ones: PBT
    explores by restoring a donor's checkpoint under changed hyper-parameters. Unchanged values are a no-op."""
    groups = scheduler.optimizer.param_groups
    for group, (lr, weight_decay) in zip(groups, configured, strict=True):
        group["initial_lr"], group["weight_decay"] = lr, weight_decay
    scheduler.base_lrs = [lr for lr, _ in configured]
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


class EarlyStopping:
    def __init__(self, mode: str, patience: int, min_delta: float) -> None:
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.best: float | None = None
        self.bad_evals = 0

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> EarlyStopping:
        """train.early_stopping's settings; without it, a stopper that never stops."""
        es = cfg.train.early_stopping
        return cls(es.mode, es.patience, es.min_delta) if es else cls("min", 10**9, 0.0)

    def update(self, value: float) -> bool:
        """Record one evaluation; True when patience has run out."""
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def restore(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals = state.get("best"), state.get("bad_evals", 0)
