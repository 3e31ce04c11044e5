"""L1 and elastic weight consolidation (EWC) penalties, computed on a plain (unsharded) module."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from raytune_ft.modeling.layers import decays


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |w| over the trainable parameters that get weight decay (biases and norm scales are left alone)."""
    weights = [p for p in model.parameters() if p.requires_grad and decays(p)]
    if not weights:
        return torch.zeros((), device=_device(model))
    # Summed in fp32 so a bf16 model does not lose the penalty to rounding.
    return torch.stack([w.abs().sum(dtype=torch.float32) for w in weights]).sum()


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[dict],
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    max_samples: int,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the trainable parameters: squared batch gradients, averaged over samples.

    Each batch's squared gradient is weighted by its size; the batch that crosses `max_samples` is cut short.
    Squaring the batch-mean gradient (not per-sample gradients) costs one backward per batch; its smaller scale
    is absorbed by the EWC strength. Runs in eval mode (no dropout noise) and leaves the model's mode and any
    accumulated .grad exactly as it found them.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    saved_grads = {name: p.grad for name, p in params.items()}
    was_training = model.training
    seen = 0
    model.eval()
    try:
        with torch.enable_grad():
            for batch in batches:
                if seen >= max_samples:
                    break
                batch = _head_of(batch, max_samples - seen)
                size = _batch_size(batch)
                for p in params.values():
                    p.grad = None
                loss_fn(model, batch).backward()
                for name, p in params.items():
                    if p.grad is not None:
                        fisher[name] += p.grad.float().pow(2) * size
                seen += size
    finally:
        for name, p in params.items():
            p.grad = saved_grads[name]
        model.train(was_training)
    if seen == 0:
        raise ValueError("estimate_fisher got no samples: the batches were empty")
    return {name: f / seen for name, f in fisher.items()}


class EWC:
    """penalty = strength / 2 * sum F * (theta - theta*)**2, with theta* the weights when this was created."""

    def __init__(
        self,
        model: nn.Module,
        fisher: dict[str, torch.Tensor],
        strength: float,
        anchor: dict[str, torch.Tensor] | None = None,
    ) -> None:
        params = dict(model.named_parameters())
        unknown = sorted(set(fisher) - set(params))
        if unknown:
            raise ValueError(f"Fisher entries for parameters the model does not have: {', '.join(unknown[:5])}")
        source = params if anchor is None else anchor
        for name in fisher:
            if name not in source or tuple(source[name].shape) != tuple(params[name].shape):
                raise ValueError(f"anchor for '{name}' is missing or does not match shape {tuple(params[name].shape)}")
        self.strength = strength
        self.fisher = {name: f.detach().to(params[name].device, torch.float32) for name, f in fisher.items()}
        # A detached fp32 copy: later optimizer steps must not move the anchor, and theta - theta* is exactly 0
        # before the first step.
        self.anchor = {name: source[name].detach().to(params[name].device, torch.float32, copy=True) for name in fisher}

    def penalty(self, model: nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        total = torch.zeros((), device=_device(model))
        for name, p in ((name, params[name]) for name in self.fisher):
            if self.fisher[name].device != p.device:
                # Built before the engine moved the model to the GPU: follow it once, then stay there.
                self.fisher[name] = self.fisher[name].to(p.device)
                self.anchor[name] = self.anchor[name].to(p.device)
            total = total + (self.fisher[name] * (p.float() - self.anchor[name]).pow(2)).sum()
        return self.strength / 2 * total

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Anchor and Fisher as `fisher.<name>` / `anchor.<name>` CPU tensors, ready for safetensors."""
        out = {f"fisher.{name}": f.detach().cpu().contiguous() for name, f in self.fisher.items()}
        out.update({f"anchor.{name}": a.detach().cpu().contiguous() for name, a in self.anchor.items()})
        return out

    @classmethod
    def from_tensors(cls, model: nn.Module, tensors: dict[str, torch.Tensor], strength: float) -> EWC:
        fisher = {k.removeprefix("fisher."): v for k, v in tensors.items() if k.startswith("fisher.")}
        anchor = {k.removeprefix("anchor."): v for k, v in tensors.items() if k.startswith("anchor.")}
        if set(fisher) != set(anchor):
            raise ValueError(f"EWC state has Fisher for {len(fisher)} parameters but anchors for {len(anchor)}")
        return cls(model, fisher, strength, anchor=anchor)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _batch_size(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise ValueError(f"cannot tell the batch size: no tensor among keys {sorted(batch)}")


def _head_of(batch: dict, n: int) -> dict:
    """The first n samples of a batch of tensors (other values pass through)."""
    return {k: v[:n] if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in batch.items()}
