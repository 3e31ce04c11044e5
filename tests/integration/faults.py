"""Fault injection for the training tests: a hook (raytune_ft/train/hooks.py) that raises in, or SIGKILLs, a Ray
Train worker at a given step. `train(cfg, hooks=[Faults(...)])` pickles it to every worker, which imports this
module by its file name (the session's Ray puts tests/integration on the workers' PYTHONPATH, conftest.local_ray)."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytune_ft.train.hooks import StepHooks


@dataclass(frozen=True)
class Faults(StepHooks):
    """RAISE_AT_STEP: every rank raises before that step. KILL_AT_STEP: SIGKILL rank RANK before that step;
    KILL_IN_CHECKPOINT_AT_STEP: while it writes that checkpoint (its files written, its manifest not). Each kill
    happens once per run: the marker file MARKER.<kind> says it did, and the restarted workers pass the step again."""

    raise_at_step: int | None = None
    kill_at_step: int | None = None
    kill_in_checkpoint_at_step: int | None = None
    rank: int = 0
    marker: str = ""

    def on_step_start(self, recipe: Any, step: int) -> None:
        if self.raise_at_step == step:
            raise RuntimeError(f"fault injected: interrupted at step {step}")
        if self.kill_at_step == step:
            self._kill_once(recipe.rank, "kill_at_step", f"killed rank {recipe.rank} at step {step}")

    def on_checkpoint_written(self, recipe: Any, step: int, directory: Path) -> None:
        if self.kill_in_checkpoint_at_step == step:
            what = f"killed rank {recipe.rank} while writing checkpoint {step}"
            self._kill_once(recipe.rank, "kill_in_checkpoint_at_step", what)

    def _kill_once(self, rank: int, kind: str, what: str) -> None:
        if rank != self.rank:
            return
        marker = Path(f"{self.marker}.{kind}")
        if not marker.exists():
            marker.write_text(what + "\n")
            os.kill(os.getpid(), signal.SIGKILL)
