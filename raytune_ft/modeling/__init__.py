"""Model building and fine-tuning parts used by the training loop: layer groups, unfreezing, regularizers."""

from raytune_ft.modeling.build import ModelBuildError, build_model, merge_for_export
from raytune_ft.modeling.layers import layer_of, num_layers, param_groups, transformer_blocks
from raytune_ft.modeling.regularizers import EWC, estimate_fisher, l1_penalty
from raytune_ft.modeling.unfreeze import unfreeze_gate, unfreeze_schedule

__all__ = [
    "EWC",
    "ModelBuildError",
    "build_model",
    "estimate_fisher",
    "l1_penalty",
    "layer_of",
    "merge_for_export",
    "num_layers",
    "param_groups",
    "transformer_blocks",
    "unfreeze_gate",
    "unfreeze_schedule",
]
