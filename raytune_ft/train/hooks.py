"""The points at which code outside the training recipe joins a run: the benchmark's measurement
(raytune_ft/bench/train.py) and the tests' fault injection (tests/integration/faults.py). Standard library only,
so that a module defining hooks does not import torch to do so."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class StepHooks:
    """Override the points you need; each gets the running recipe (raytune_ft.train.loop.Recipe: its rank,
    world, engine, clock, total steps ...). Every rank calls every hook at the same point of the run, so a hook
    may run a collective (over_ranks) as long as it does so on every rank."""

    def on_step_start(self, recipe: Any, step: int) -> None:
        """Before optimizer step STEP (0-based) reads its batches: after step STEP's predecessor was evaluated,
        reported and saved."""

    def after_backward(self, recipe: Any, step: int) -> None:
        """A micro-batch of step STEP has its gradients, before the optimizer steps."""

    def on_step_end(self, recipe: Any, done: int) -> bool:
        """DONE optimizer steps are done, before any evaluation, report or checkpoint due at DONE. True ends the
        run here, with none of them."""
        return False

    def on_checkpoint_written(self, recipe: Any, step: int, directory: Path) -> None:
        """This rank's files of checkpoint STEP are in DIRECTORY; its manifest is not, and nothing was reported."""
