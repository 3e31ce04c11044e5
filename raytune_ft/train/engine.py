"""The DeepSpeed engine around a built model, as `train` configures it: activation checkpointing, the AdamW
kernel, torch.compile. The Ray Train loop and `bench lm`'s bare DeepSpeed loop both start their engine here, so
that what the benchmark compares differs only by Ray."""

from __future__ import annotations

from typing import Any

import torch

from raytune_ft.config.schema import ExperimentConfig
from raytune_ft.train.ds_config import import_deepspeed


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Hugging Face's per-layer checkpointing, non-reentrant: it needs no input that requires grad, so it works
    with LoRA and frozen embeddings as it is, and under ZeRO-3's partitioned parameters."""
    if not getattr(model, "supports_gradient_checkpointing", True):
        raise ValueError(f"train.activation_checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' name for it from 5.x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False  # a KV cache is of no use in training and conflicts with recomputation


def build_deepspeed_ops() -> None:
    """Compile the DeepSpeed C++ op a run may load into torch's extension cache now, if it is not there yet: CPU
    Adam (ZeRO-Offload's optimizer). DeepSpeed builds it on first use, 45 s on a small CPU, inside the first run
    that offloads. `make test` runs this beside the suite. (The other op a CPU run would build, the shared-memory
    all-reduce, is switched off in import_deepspeed.)"""
    import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("CPUAdamBuilder").load()


def make_optimizer(cfg: ExperimentConfig, groups: list[dict[str, Any]], on_gpu: bool) -> torch.optim.Optimizer:
    if cfg.deepspeed.offload_optimizer:
        import_deepspeed()
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.train.lr, adamw_mode=True)
    fused = on_gpu if cfg.train.fused_adamw is None else cfg.train.fused_adamw
    # fused=False is not the same as leaving it out: PyTorch then picks foreach, its fastest unfused kernel
    return torch.optim.AdamW(groups, lr=cfg.train.lr, **({"fused": True} if fused else {}))


def start_engine(
    cfg: ExperimentConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ds_config: dict[str, Any],
) -> Any:
    deepspeed = import_deepspeed()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    if cfg.train.compile:
        engine.compile()
    _drop_every_frozen_name(engine)
    return engine


def _drop_every_frozen_name(engine: Any) -> None:
    """DeepSpeed leaves frozen weights out of a checkpoint by their names in named_parameters(), which names a tied
    weight once: its second name (a causal LM's lm_head, tied to the embeddings) stayed, so every LoRA checkpoint of
    SmolLM2-135M carried the 113 MB embedding matrix, and a PBT exploit moved it. Every name of a frozen weight is
    dropped here; loading is not strict when weights are frozen, and the tie holds in the model either way."""
    original = engine.module_state_dict

    def module_state_dict(
        destination: Any = None, prefix: str = "", keep_vars: bool = False, exclude_frozen_parameters: bool = False
    ) -> Any:
        sd = original(
            destination=destination,
            prefix=prefix,
            keep_vars=keep_vars,
            exclude_frozen_parameters=exclude_frozen_parameters,
        )
        if exclude_frozen_parameters:
            for name, param in engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    sd.pop(prefix + name, None)
        return sd

    engine.module_state_dict = module_state_dict
