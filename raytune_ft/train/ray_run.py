"""A Ray Train run as this project starts one: Ray's DataParallelTrainer on the experiment's workers, with the
torch process group of process_group.py, and without the per-run actor of a feature the engine never uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from raytune_ft.config import ExperimentConfig
from raytune_ft.config.schema import EMBEDDED_PLACEMENT_S
from raytune_ft.errors import RaytuneFtError
from raytune_ft.train.ray_cluster import inherited_environment, placement_env


class WorkersNotPlaced(RaytuneFtError, RuntimeError):
    """A training run's workers could not be placed within cluster.placement_timeout_s."""


class Trainer(DataParallelTrainer):
    """Ray Train V2 starts a DatasetManager actor for every run, datasets or not (a process that imports Ray
    Data, and each worker imports Ray Data to unpickle its handle: ~3 s of CPU per run here). The engine hands its
    workers tokenised splits through the object store and passes no datasets, so the run goes without it.

    A run whose workers cannot be placed fails after cluster.placement_timeout_s with WorkersNotPlaced, which says
    what it asked for and what holds the resources. Ray Train's own controller retries a worker group that did not
    start, without limit: a run behind a Serve app that held one of the two CPUs waited forever."""

    placement_timeout_s: float = EMBEDDED_PLACEMENT_S
    placement_env: dict[str, str] = {}  # set per instance by torch_trainer
    embedded: bool = True

    def fit(self) -> Any:
        from ray.train import ControllerError
        from ray.train.v2._internal.exceptions import (
            InsufficientClusterResourcesError,
            WorkerGroupStartupTimeoutError,
        )

        if self.embedded and not self.fits():  # nothing will add resources to an embedded Ray: fail now
            raise WorkersNotPlaced(self.not_placed(waited=False))
        try:
            with inherited_environment(self.placement_env):
                return super().fit()
        except ControllerError as exc:
            failure = exc.controller_failure
            if isinstance(failure, (WorkerGroupStartupTimeoutError, InsufficientClusterResourcesError)):
                raise WorkersNotPlaced(self.not_placed(waited=True)) from None
            raise

    def per_worker(self) -> dict[str, float]:
        return {k: v for k, v in (self.scaling_config.resources_per_worker or {}).items() if v}

    def fits(self) -> bool:
        import ray

        total = ray.cluster_resources()
        return all(total.get(k, 0) >= v * self.scaling_config.num_workers for k, v in self.per_worker().items())

    def not_placed(self, waited: bool) -> str:
        import ray

        from raytune_ft.train.ray_cluster import resource_holders

        scaling, per_worker = self.scaling_config, self.per_worker()
        asked = ", ".join(f"{v * scaling.num_workers:g} {k}" for k, v in per_worker.items())
        total = {k: ray.cluster_resources().get(k, 0) for k in per_worker}
        free = {k: ray.available_resources().get(k, 0) for k in per_worker}
        where = "the embedded Ray" if self.embedded else "the cluster"
        outcome = (
            f"could not be placed within {self.placement_timeout_s:g} s (cluster.placement_timeout_s)"
            if waited
            else "can never be placed"
        )
        lines = [
            f"the training run's {scaling.num_workers} worker(s) {outcome}: they ask for {asked} "
            f"({', '.join(f'{v:g} {k}' for k, v in per_worker.items())} each); {where} has "
            + ", ".join(f"{total[k]:g} {k} ({free[k]:g} free)" for k in per_worker)
            + "."
        ]
        holders = resource_holders()
        if holders:
            lines.append("Held by: " + "; ".join(holders) + ".")
        hints = []
        if any("ServeReplica" in h for h in holders):
            hints.append("stop the Serve app (`raytune-ft serve stop`, or serve.shutdown())")
        if not self.fits():
            hints.append("ask for fewer workers or resources (scaling.num_workers, scaling.cpus_per_worker)")
        elif holders:
            hints.append("wait for the runs above to end")
        if self.embedded:
            hints.append("or run on a larger cluster (cluster.address)")
        else:
            hints.append("or give the autoscaler longer (cluster.placement_timeout_s)")
        lines.append("To go on: " + ", ".join(hints) + ".")
        return " ".join(lines)

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
    # a worker group that does not start within the deadline ends the run (Ray Train's default: retry forever)
    run_config.failure_config.controller_failure_limit = 0
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
    trainer = Trainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=scaling,
        backend_config=ProcessGroupConfig(backend=backend),
        run_config=run_config,
        **trainer_args,
    )
    trainer.placement_timeout_s = cfg.cluster.placement_deadline_s
    trainer.placement_env = placement_env(cfg)
    trainer.embedded = cfg.cluster.address is None
    return trainer
