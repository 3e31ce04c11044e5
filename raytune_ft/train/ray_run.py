"""A Ray Train run as this project starts one: Ray's DataParallelTrainer on the experiment's workers, with the
torch process group of process_group.py, and without the per-run actor of a feature the engine never uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from raytune_ft.config import ExperimentConfig


class Trainer(DataParallelTrainer):
    """Ray Train V2 starts a DatasetManager actor for every run, datasets or not (a process that imports Ray
    Data, and each worker imports Ray Data to unpickle its handle: ~3 s of CPU per run here). The engine hands its
    workers tokenised splits through the object store and passes no datasets, so the run goes without it."""

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        from ray.train.v2._internal.callbacks import DatasetsCallback

        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]


def run_train_loop(config: dict[str, Any]) -> None:
    """The training loop, imported in the workers that run it: a Tune trial's actor only hands this function to
    Ray Train and so need not import torch and the loop (about 2 s of every trial's start and restart)."""
    from raytune_ft.train.loop import train_loop

    train_loop(config)


def torch_trainer(
    cfg: ExperimentConfig,
    loop: Callable,
    loop_config: dict[str, Any],
    run_config: Any,
    stock: bool = False,
    **trainer_args: Any,
) -> Any:
    """A trainer on the experiment's workers with a torch.distributed process group: gloo on CPU, NCCL on GPU.
    STOCK: Ray's own TorchTrainer as it comes (the reference `bench train` measures start-up against)."""
    from ray.train import ScalingConfig

    from raytune_ft.train.process_group import ProcessGroupConfig, ray_helpers_present

    backend = "nccl" if cfg.scaling.use_gpu else "gloo"
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker or 1.0
    scaling = ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=resources,
        placement_strategy=cfg.scaling.placement_strategy,
    )
    if stock or not ray_helpers_present():  # else another Ray release: its TorchTrainer, whose controller imports torch
        from ray.train.torch import TorchConfig, TorchTrainer

        return TorchTrainer(
            loop,
            train_loop_config=loop_config,
            scaling_config=scaling,
            torch_config=TorchConfig(backend=backend),
            run_config=run_config,
            **trainer_args,
        )
    return Trainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=scaling,
        backend_config=ProcessGroupConfig(backend=backend),
        run_config=run_config,
        **trainer_args,
    )
