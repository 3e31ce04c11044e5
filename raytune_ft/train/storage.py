"""Pre-flight check of where a run writes, before any worker starts: a run directory that cannot be written, or a
disk without room for the checkpoints the run will keep, is an error now rather than a crash hours in."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from raytune_ft.config import ExperimentConfig
from raytune_ft.errors import RaytuneFtError
from raytune_ft.model_source import ModelSourceError, resolve_model_source

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")
# A full fine-tuning checkpoint holds the weights, an fp32 master copy and Adam's two moments (DeepSpeed ZeRO on
# CPU keeps fp32 throughout): about 4x the weights. LoRA and partial runs save the trainable part and its state,
# but the export that ends the run is the whole model.
FULL_CHECKPOINT_FACTOR = 4.0
MARGIN = 1.2


class StorageError(RaytuneFtError, RuntimeError):
    """The run directory cannot be written, or its disk lacks the room the run needs."""


def model_weight_bytes(ref: str) -> int | None:
    """Size of a local model's weight files; None for a hub id (not on this machine yet)."""
    try:
        source = Path(resolve_model_source(ref))
    except ModelSourceError:
        return None
    if not source.is_dir():
        return None
    return sum(p.stat().st_size for pattern in WEIGHT_FILES for p in source.glob(pattern)) or None


def bytes_needed(cfg: ExperimentConfig, concurrent_runs: int = 1) -> int | None:
    """What a run (or CONCURRENT_RUNS trials side by side) will write at most: the checkpoints it keeps, one being
    written, and the export; None when the model's size is not known here."""
    weights = model_weight_bytes(cfg.model.name_or_path)
    if weights is None:
        return None
    per_checkpoint = weights * (FULL_CHECKPOINT_FACTOR if cfg.finetune.method == "full" else 1.0)
    keep = cfg.tune.keep_checkpoints if cfg.tune is not None else cfg.train.keep_checkpoints
    return int(MARGIN * (concurrent_runs * per_checkpoint * (keep + 1) + weights))


def check_storage(run_dir: Path, need: int | None, what: str = "run directory") -> None:
    """Create RUN_DIR, write and remove a probe file in it, and compare its disk's free space with NEED bytes."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".raytune-ft-probe-{uuid.uuid4().hex}"
        with open(probe, "wb") as fh:
            fh.write(b"raytune-ft storage check\n")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        raise StorageError(f"{what} {run_dir} cannot be written: {exc.strerror or exc}") from None
    if need is None:
        return
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise StorageError(
            f"{what} {run_dir}: {_gb(free)} free, but the run's checkpoints and export need about {_gb(need)}; "
            "free space, point output_dir (or tune.storage_path) at a larger disk, or keep fewer checkpoints "
            "(train.keep_checkpoints / tune.keep_checkpoints)"
        )


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"
