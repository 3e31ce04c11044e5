"""Model FLOPs utilisation: achieved training FLOPs over the accelerator's dense peak."""

from __future__ import annotations

from typing import Any

# Dense bf16/fp16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets; the first name that
# occurs in torch.cuda.get_device_name() wins, so more specific names come first.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "T4": 65.0,
}


def train_flops_per_token(params: int, trainable: int) -> int:
    """Forward 2N, backward 2N for activation gradients through the whole network plus 2 per trainable weight;
    6N for full fine-tuning. The attention score term (small at these sequence lengths) is left out."""
    return 4 * params + 2 * trainable


def peak_tflops_of(device_name: str) -> float | None:
    for name, tflops in PEAK_TFLOPS.items():
        if name in device_name:
            return tflops
    return None


def mfu(metrics: dict[str, Any], devices: int, peak_tflops: float | None = None) -> float | None:
    """MFU of a Ray run's reported metrics on CUDA; None on CPU or on an accelerator of unknown peak."""
    if not str(metrics.get("device", "")).startswith("cuda") or not metrics.get("tokens_per_s"):
        return None
    if peak_tflops is None:
        peak_tflops = peak_tflops_of(str(metrics.get("device_name", "")))
    if peak_tflops is None:
        return None
    achieved = metrics["tokens_per_s"] * train_flops_per_token(metrics["n_params"], metrics["n_trainable"])
    return achieved / (peak_tflops * 1e12 * devices)
