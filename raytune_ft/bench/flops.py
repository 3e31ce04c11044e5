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


def train_flops_per_token(params: int, trainable: int, layers: int = 0, hidden: int = 0, seq_len: float = 0) -> float:
    """Training FLOPs per token. Weights: forward 2N, backward 2N for activation gradients through the whole
    network plus 2 per trainable weight: 6N for full fine-tuning, 4N + 2N_trainable for LoRA (N: matmul weights,
    embedding tables left out). Attention: PaLM's count, 12 x layers x hidden x seq_len (QK^T and AV, 2 x 2 x
    hidden x seq_len a layer forward, x3 with the backward; the full S x S scores, although a causal kernel computes
    about half of them) - the attention backward is needed whether or not any weight trains."""
    return 4 * params + 2 * trainable + 12 * layers * hidden * seq_len


def peak_tflops_of(device_name: str) -> float | None:
    for name, tflops in PEAK_TFLOPS.items():
        if name in device_name:
            return tflops
    return None


def flops_per_token(metrics: dict[str, Any], attention: bool = True) -> float | None:
    """From a run's reported sizes; the sequence length is the run's mean tokens per sample."""
    params = metrics.get("n_matmul_params", metrics.get("n_params"))
    trainable = metrics.get("n_matmul_trainable", metrics.get("n_trainable"))
    if params is None or trainable is None:
        return None
    seq_len = 0.0
    if attention and metrics.get("samples_per_s") and metrics.get("tokens_per_s"):
        seq_len = metrics["tokens_per_s"] / metrics["samples_per_s"]
    layers, hidden = (metrics.get("n_layers") or 0, metrics.get("hidden_size") or 0) if attention else (0, 0)
    return train_flops_per_token(params, trainable, layers, hidden, seq_len)


def mfu(
    metrics: dict[str, Any], devices: int, peak_tflops: float | None = None, attention: bool = True
) -> float | None:
    """MFU of a run's reported metrics on CUDA; None on CPU or on an accelerator of unknown peak. `attention`:
    count the attention FLOPs (train_flops_per_token) or the weights' alone (6N for full fine-tuning)."""
    if not str(metrics.get("device", "")).startswith("cuda") or not metrics.get("tokens_per_s"):
        return None
    if peak_tflops is None:
        peak_tflops = peak_tflops_of(str(metrics.get("device_name", "")))
    per_token = flops_per_token(metrics, attention)
    if peak_tflops is None or per_token is None:
        return None
    return metrics["tokens_per_s"] * per_token / (peak_tflops * 1e12 * devices)
