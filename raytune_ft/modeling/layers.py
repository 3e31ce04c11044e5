"""Which transformer layer each parameter belongs to, and optimizer param groups built on that."""

from __future__ import annotations

from torch import nn

# Module-name fragments of token/position embeddings across BERT-, Llama- and GPT-2-style models.
EMBEDDING_MARKERS = ("embeddings", "embed_tokens", "wte", "wpe")


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The (qualified name, ModuleList) of the model's transformer blocks, or None when it has none.

    Found by shape, not by architecture name: the ModuleList of same-class modules holding the most parameters
    (bert.encoder.layer, model.layers, transformer.h, the same under a peft wrapper). Nested lists such as
    per-block experts always hold fewer parameters than the list of blocks around them.
    """
    best: tuple[str, nn.ModuleList] | None = None
    best_size = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or len({type(m) for m in module}) != 1:
            continue
        size = sum(_numel(p) for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    return best


def num_layers(model: nn.Module) -> int:
    blocks = transformer_blocks(model)
    return len(blocks[1]) if blocks else 0


def layer_of(model: nn.Module) -> dict[str, str]:
    """Parameter name -> "embeddings", "layer.<i>" (0 = lowest block) or "head" (everything else)."""
    blocks = transformer_blocks(model)
    prefix = f"{blocks[0]}." if blocks else None
    labels: dict[str, str] = {}
    for name, _ in model.named_parameters():
        if prefix is not None and name.startswith(prefix):
            labels[name] = f"layer.{name[len(prefix) :].split('.')[0]}"
        elif any(marker in part for part in name.split(".")[:-1] for marker in EMBEDDING_MARKERS):
            labels[name] = "embeddings"
        else:
            labels[name] = "head"
    return labels


def depth(label: str, num_layers: int) -> int:
    """How many steps below the head a group sits: head 0, top block 1, ..., embeddings num_layers + 1."""
    if label == "head":
        return 0
    if label == "embeddings":
        return num_layers + 1
    return num_layers - int(label.removeprefix("layer."))


def decays(param: nn.Parameter) -> bool:
    """Weight decay (and L1) applies to matrices only, never to biases or LayerNorm/RMSNorm scales."""
    # ZeRO-3 flattens partitioned parameters; ds_shape keeps the real shape.
    return len(getattr(param, "ds_shape", param.shape)) >= 2


def param_groups(model: nn.Module, lr: float, weight_decay: float, layerwise_lr_decay: float) -> list[dict]:
    """Torch optimizer groups of the trainable parameters, one per (layer label, decay or not).

    Each group has `params`, `lr`, `weight_decay` and `group` (the layer_of label). The head gets `lr` and every
    step down multiplies by `layerwise_lr_decay`: layer.<i> gets lr * decay**(L - i), embeddings lr * decay**(L + 1).
    Order is bottom-up (embeddings, layer.0, ..., head), decayed group before the undecayed one.
    """
    labels = layer_of(model)
    total = num_layers(model)
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((labels[name], decays(param)), []).append(param)
    keys = sorted(buckets, key=lambda key: (-depth(key[0], total), not key[1]))
    return [
        {
            "params": buckets[label, decay],
            "lr": lr * layerwise_lr_decay ** depth(label, total),
            "weight_decay": weight_decay if decay else 0.0,
            "group": label,
        }
        for label, decay in keys
    ]


def _numel(param: nn.Parameter) -> int:
    # ZeRO-3 partitioned parameters report numel 0 locally; ds_numel is the full size.
    return getattr(param, "ds_numel", param.numel())
