"""Memory figures of a training worker, for the training metrics and `raytune-ft bench train`."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import torch


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; elsewhere the peak is the best figure there is)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def model_state_mb(engine: Any) -> float:
    """Bytes held by live tensors in this process: parameters (ZeRO-3 partitions included), gradients and
    optimizer states, each storage counted once. RSS cannot say this: it also holds the interpreter, libraries,
    memory-mapped weight files and freed-but-kept heap."""
    import gc

    storages: dict[int, int] = {}

    def add(tensor: Any) -> None:
        if issubclass(type(tensor), torch.Tensor):  # type(), not isinstance: no __class__ lookups on odd objects
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for obj in gc.get_objects():
        add(obj)
    for param in engine.module.parameters():
        add(param)
        add(param.grad)
        add(getattr(param, "ds_tensor", None))
    storages.pop(0, None)  # empty storages (parameters whose data ZeRO-3 moved into partitions)
    return sum(storages.values()) / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


class SteadyClock:
    """Samples, tokens and seconds of steady-state steps: the first step in a process pays for lazy
    initialisation and only marks `first_step_at`."""

    def __init__(self) -> None:
        self.first_step_at: float | None = None
        self.seconds, self.samples, self.tokens = 0.0, 0, 0

    def step_done(self, began: float, samples: int, tokens: int) -> None:
        """`began` is the step's time.perf_counter() at its start."""
        if self.first_step_at is None:
            self.first_step_at = time.time()
        else:
            self.seconds += time.perf_counter() - began
            self.samples += samples
            self.tokens += tokens


def model_sizes(model: torch.nn.Module) -> dict[str, int | None]:
    """Parameter counts for throughput and MFU figures, ZeRO-3 partitions counted whole. `n_matmul*` leave out
    embedding tables: a lookup does no multiply-adds, so they add no training FLOPs (the output head does)."""
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}

    def count(trainable_only: bool, matmul_only: bool) -> int:
        return sum(
            getattr(p, "ds_numel", p.numel())
            for p in model.parameters()
            if (p.requires_grad or not trainable_only) and (id(p) not in embedding or not matmul_only)
        )

    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return {
        "n_params": count(False, False),
        "n_trainable": count(True, False),
        "n_matmul_params": count(False, True),
        "n_matmul_trainable": count(True, True),
        "n_layers": int(layers) if layers else None,
        "hidden_size": int(hidden) if hidden else None,
    }
