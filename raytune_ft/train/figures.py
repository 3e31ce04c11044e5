"""Figures a Ray Train Result keeps. Standard library and Ray only, so that the no-op benchmark loop that
imports it stays a no-op."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any


def report_figures(metrics: dict[str, Any], rank: int) -> None:
    """Ray Train V2 keeps only metrics reported with a checkpoint, so rank 0 attaches one holding nothing but
    these figures."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="raytune-ft-figures-") as tmp:
        (Path(tmp) / "figures.json").write_text(json.dumps(metrics, default=str))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
