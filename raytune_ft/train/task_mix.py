"""Which task each optimizer step of a multi-task run trains on.

Every worker must run the same task at a step (their gradients are reduced together, and a head no worker used
gets none), so the choice is a pure function of the seed and the step: no communication, and a resumed run
draws the same tasks it would have drawn without the interruption.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from raytune_ft.train.batches import StepPlan

SAMPLING = ("proportional", "uniform", "temperature")


def task_weights(sizes: dict[str, int], sampling: str, temperature: float = 2.0) -> dict[str, float]:
    """Probability of each task per step from its training-set size: proportional (n), uniform (1), or
    temperature-scaled (n ** (1/T): T=1 is proportional, larger T moves towards uniform, so small tasks are not
    drowned out by a large one)."""
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, got '{sampling}'")
    if not sizes or any(n <= 0 for n in sizes.values()):
        raise ValueError(f"every task needs training rows, got {sizes}")
    if sampling == "temperature" and temperature < 1:
        raise ValueError(f"temperature must be >= 1, got {temperature}")
    exponent = {"proportional": 1.0, "uniform": 0.0, "temperature": 1.0 / temperature}[sampling]
    raw = {name: n**exponent for name, n in sizes.items()}
    total = sum(raw.values())
    return {name: value / total for name, value in raw.items()}


def task_at(step: int, weights: dict[str, float], seed: int) -> str:
    """The task of optimizer step STEP (0-based), the same on every worker and across restarts."""
    names = sorted(weights)  # dict order must not matter
    draw = random.Random(seed * 1_000_003 + step).random()
    acc = 0.0
    for name in names:
        acc += weights[name]
        if draw < acc:
            return name
    return names[-1]  # rounding left the cumulative sum a hair under 1


def task_schedule(total_steps: int, weights: dict[str, float], seed: int) -> list[str]:
    return [task_at(step, weights, seed) for step in range(total_steps)]


@dataclass
class TaskStream:
    """One task's side of the loop: its rows, how it steps through them, its loss and its weight."""

    name: str | None  # None: the experiment's own task of a single-task run
    plan: StepPlan
    train: dict[str, list]
    val: dict[str, list]
    loss: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]
    weight: float = 1.0
    classes: list[str] = field(default_factory=list)
    names: list[str] | None = None  # label names, when the task has them


class TaskMix:
    """The micro-batches of each optimizer step. With one task, every step is that task's step; with several,
    step s trains task `task_at(s)` on that task's next batch (its own epochs and shuffling)."""

    def __init__(
        self, primary: TaskStream, extras: list[TaskStream], total: int, sampling: str, temperature: float, seed: int
    ) -> None:
        self.primary = primary
        self.streams = {s.name: s for s in [primary, *extras]}
        self.weights: dict[str, float] | None = None
        self.schedule: list[str] | None = None
        self.local: list[int] = []
        if extras:
            self.weights = task_weights({s.name: s.plan.n_train for s in self.streams.values()}, sampling, temperature)
            self.schedule = task_schedule(total, self.weights, seed)
            seen: dict[str, int] = {}
            for name in self.schedule:
                self.local.append(seen.get(name, 0))
                seen[name] = seen.get(name, 0) + 1
        self._perms: dict[str | None, tuple[int, torch.Tensor]] = {}

    def step(self, step: int, rank: int) -> tuple[TaskStream, list[list[int]]]:
        """The task of optimizer step STEP and the row indices of each micro-batch RANK runs for it."""
        if self.schedule is None:
            stream, local = self.primary, step
        else:
            stream, local = self.streams[self.schedule[step]], self.local[step]
        epoch = local // stream.plan.steps_per_epoch
        cached = self._perms.get(stream.name)
        if cached is None or cached[0] != epoch:
            cached = self._perms[stream.name] = (epoch, stream.plan.permutation(epoch))
        return stream, stream.plan.micro_batches(local, rank, cached[1])
