"""The DeepSpeed JSON, generated from the experiment's `deepspeed` and `train` sections."""

from __future__ import annotations

import copy
import os
import sys
import types
from typing import Any

from raytune_ft.config.schema import ExperimentConfig


def resolved_precision(cfg: ExperimentConfig, cuda_available: bool) -> str:
    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    if cfg.scaling.use_gpu and cuda_available:
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def deepspeed_config(cfg: ExperimentConfig, precision: str, hidden_size: int | None = None) -> dict[str, Any]:
    """Optimizer and LR schedule stay outside this JSON: the training loop builds them, so layer-wise learning
    rates and gradual unfreezing survive (DeepSpeed's own schedulers set one LR for every group).

    With the model's `hidden_size`, communication buckets are sized to the model as Hugging Face's DeepSpeed
    integration does: DeepSpeed's defaults (5e8 elements, 2 GB in fp32) exceed a small model's own gradients
    and would erase what ZeRO saves. `deepspeed.overrides` still wins."""
    ds, train = cfg.deepspeed, cfg.train
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if hidden_size and ds.zero_stage > 0:
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        zero["allgather_bucket_size"] = hidden_size * hidden_size
        if ds.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if ds.zero_stage == 3:
        # Export gathers the full weights on rank 0 from the engine, not from 16-bit shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, ds.overrides)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def import_deepspeed() -> types.ModuleType:
    """`import deepspeed`, without two things it would load for nothing: its Muon optimizer (below) and MLflow,
    which its autotuner imports whenever MLflow is installed (this project installs it for Tune's tracking): about
    0.9 s of every worker's start-up here. The engine never runs DeepSpeed's autotuner, which alone would log there.
    Called before every DeepSpeed engine starts, also when something else imported DeepSpeed first.
    """
    stand_in_for_deepspeed_muon()
    if "deepspeed" not in sys.modules:
        own_ninja_first()
        hide_mlflow = "mlflow" not in sys.modules
        if hide_mlflow:
            sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError meanwhile
        try:
            import deepspeed
        finally:
            if hide_mlflow and sys.modules.get("mlflow", False) is None:
                del sys.modules["mlflow"]
    deepspeed = sys.modules["deepspeed"]
    # On a CPU, DeepSpeed's comm backend builds (25 s of two cores, once) and loads its shared-memory all-reduce,
    # which only DeepSpeed inference's tensor parallelism calls; training all-reduces through torch.distributed.
    # Marked incompatible, the backend skips it (it reads this probe, cached on first use, before loading it).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def own_ninja_first() -> None:
    """Put this Python environment's `ninja` (a DeepSpeed dependency) first on PATH when it has one. torch builds
    DeepSpeed's C++ ops (CPU Adam, the CPU shared-memory all-reduce) with the first `ninja` on PATH, and a system
    ninja of another version reads the shared build log differently: every process that found the other one
    rebuilt the ops (about 40 s of two cores), e.g. workers of a `ray start` head (venv on PATH) and of an embedded
    Ray started from `.venv/bin/python` (not)."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if os.path.isfile(os.path.join(bin_dir, "ninja")) and path[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *[p for p in path if p != bin_dir]])


def stand_in_for_deepspeed_muon() -> None:
    """DeepSpeed's ZeRO code imports its Muon optimizer modules on every run, to ask `isinstance(optimizer,
    MuonWithAuxAdam)` and to fetch `muon_update` that only Muon parameter groups call. Importing them runs
    torch.compile decorators that load torch._inductor: about 2 s of every worker's start-up on CPU. This loop
    builds AdamW or DeepSpeedCPUAdam itself, never Muon, so stand-ins answer those checks the same way (nothing
    is a MuonWithAuxAdam) and fail loudly if Muon code were ever reached."""
    package = "deepspeed.runtime.zero.muon"
    if f"{package}.muon_optimizer" in sys.modules or f"{package}.original_muon" in sys.modules:
        return

    def muon_update(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("raytune_ft never uses DeepSpeed's Muon optimizer; muon_update should not run")

    optimizer_module = types.ModuleType(f"{package}.muon_optimizer", "raytune_ft stand-in (no Muon)")
    optimizer_module.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})  # type: ignore[attr-defined]
    update_module = types.ModuleType(f"{package}.original_muon", "raytune_ft stand-in (no Muon)")
    update_module.muon_update = muon_update  # type: ignore[attr-defined]
    sys.modules[optimizer_module.__name__] = optimizer_module
    sys.modules[update_module.__name__] = update_module
