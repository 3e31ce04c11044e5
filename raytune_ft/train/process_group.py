"""The torch.distributed process group of a Ray Train run (gloo on CPU, NCCL on GPU), set up as Ray's TorchConfig
sets it up, from a module that does not import torch.

Ray Train's controller unpickles the run's backend config. Ray's TorchConfig lives in a module that imports torch,
so every run's controller spent about 2.3 s (of its ~4.5 s start, before any worker is asked for) importing torch
only to send functions to the workers. Here the controller holds this light config, and each function it sends
imports Ray's torch helpers on the worker, which imports torch anyway."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.train.backend import Backend, BackendConfig

RAY_TORCH_HELPERS = ("_setup_torch_process_group", "_set_torch_distributed_env_vars", "_shutdown_torch")


def ray_helpers_present() -> bool:
    """Whether this Ray has the worker-side helpers used below (they are private to ray.train.torch.config)."""
    from ray.train.torch import config

    return all(hasattr(config, name) for name in RAY_TORCH_HELPERS) and hasattr(config, "TorchConfigContextManager")


def _on_worker(helper: str, *args: Any, **kwargs: Any) -> Any:
    from ray.train.torch import config

    return getattr(config, helper)(*args, **kwargs)


def _set_master(addr: str, port: int) -> None:
    import os

    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


class _DeviceContext:
    """Ray's TorchConfigContextManager (sets the worker's CUDA device), imported where the train function runs."""

    def __enter__(self) -> None:
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        self._inner.__enter__()

    def __exit__(self, *exc: object) -> bool:
        return self._inner.__exit__(*exc)


class _ProcessGroupBackend(Backend):
    share_cuda_visible_devices = True  # as Ray's torch backend: each worker picks its GPU by local rank

    def on_start(self, worker_group: Any, backend_config: ProcessGroupConfig) -> None:
        import ray
        from ray.train._internal.utils import get_address_and_port

        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, addr, port)
        worker_group.execute(_on_worker, "_set_torch_distributed_env_vars")
        setups = [
            worker_group.execute_single_async(
                rank,
                _on_worker,
                "_setup_torch_process_group",
                backend=backend_config.backend,
                world_rank=rank,
                world_size=len(worker_group),
                init_method="env://",
                timeout_s=backend_config.timeout_s,
            )
            for rank in range(len(worker_group))
        ]
        ray.get(setups)

    def on_shutdown(self, worker_group: Any, backend_config: ProcessGroupConfig) -> None:
        import logging

        import ray
        from ray.exceptions import GetTimeoutError

        shutdowns = worker_group.execute_async(
            _on_worker, "_shutdown_torch", destroy_process_group=len(worker_group) > 1
        )
        try:
            ray.get(shutdowns, timeout=backend_config.shutdown_timeout_s)
        except GetTimeoutError:
            logging.getLogger(__name__).warning(
                "torch process group shutdown timed out after %s s", backend_config.shutdown_timeout_s
            )


@dataclass
class ProcessGroupConfig(BackendConfig):
    backend: str = "gloo"
    timeout_s: int = 1800
    shutdown_timeout_s: float = 30

    @property
    def backend_cls(self) -> type[Backend]:
        return _ProcessGroupBackend

    @property
    def train_func_context(self) -> type:
        return _DeviceContext

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}
