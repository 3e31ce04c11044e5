"""Fine-tuning engine: DeepSpeed ZeRO on Ray Train, checkpoints and resume.

The names below load on first use: Ray Train's controller imports raytune_ft.train.process_group, and it must not
pay for torch and the training loop to do so."""

from raytune_ft.lazy import exports

_HOMES = {
    "CheckpointError": "raytune_ft.train.checkpoint",
    "verify_checkpoint": "raytune_ft.train.checkpoint",
    "TrainResult": "raytune_ft.train.trainer",
    "train": "raytune_ft.train.trainer",
}
__all__ = sorted(_HOMES)

__getattr__ = exports(__name__, _HOMES)
