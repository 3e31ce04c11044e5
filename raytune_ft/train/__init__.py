"""Fine-tuning engine: DeepSpeed ZeRO on Ray Train, checkpoints and resume."""

from raytune_ft.train.checkpoint import CheckpointError, verify_checkpoint
from raytune_ft.train.trainer import CONFIG_FILE, TrainResult, run_dir_for, train

__all__ = ["CONFIG_FILE", "CheckpointError", "TrainResult", "run_dir_for", "train", "verify_checkpoint"]
