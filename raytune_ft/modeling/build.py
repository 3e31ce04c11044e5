"""Load a Hugging Face model for the configured task and prepare it for fine-tuning (LoRA, freezing, dropout)."""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.pytorch_utils import Conv1D

from raytune_ft.config.schema import FinetuneConfig, FreezeConfig, LoraConfig, ModelConfig, Task
from raytune_ft.errors import RaytuneFtError
from raytune_ft.model_source import resolve_model_source
from raytune_ft.modeling.layers import layer_of, num_layers

DROPOUT_SUFFIXES = ("dropout", "dropout_prob", "dropout_rate", "pdrop")


class ModelBuildError(RaytuneFtError, ValueError):
    pass


def build_model(
    model: ModelConfig,
    finetune: FinetuneConfig,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
) -> nn.Module:
    """The model for `model.task`, with the `finetune` method applied: a PreTrainedModel, or a PeftModel for LoRA.

    For sequence-classification the head gets `num_labels` outputs (default: len(label_names), else the
    checkpoint's own); labels are named by `label_names` or by their ids. Both are ignored for causal-lm.
    The model comes back as from_pretrained leaves it (eval mode); the training loop switches it to train.
    """
    source = resolve_model_source(model.name_or_path)
    classification = model.task == "sequence-classification"
    config = AutoConfig.from_pretrained(
        source,
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        **(_label_kwargs(num_labels, label_names) if classification else {}),
    )
    _ensure_pad_token(config, model.name_or_path, classification)
    if finetune.dropout is not None and not set_dropout(config, finetune.dropout):
        raise ModelBuildError(
            f"finetune.dropout: the {config.model_type} config has no dropout setting "
            f"(no attribute ending in {', '.join(DROPOUT_SUFFIXES)})"
        )

    auto = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
    net = auto.from_pretrained(
        source,
        config=config,
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        # Train in fp32 whatever the checkpoint's dtype; DeepSpeed casts to bf16/fp16 itself when asked.
        dtype=torch.float32,
        # A checkpoint with another number of classes gets a fresh head instead of a load error.
        ignore_mismatched_sizes=classification,
        **({} if model.attn_implementation == "auto" else {"attn_implementation": model.attn_implementation}),
    )
    if finetune.method == "lora":
        net = apply_lora(net, finetune.lora, model.task)
    freeze(net, finetune.freeze)
    return net


def set_dropout(config: PretrainedConfig, p: float) -> list[str]:
    """Set every numeric dropout probability in the config (and its sub-configs); returns the names set."""
    changed = []
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            changed += [f"{name}.{sub}" for sub in set_dropout(value, p)]
        elif (
            name.endswith(DROPOUT_SUFFIXES)
            and not name.startswith("_")
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        ):
            setattr(config, name, p)
            changed.append(name)
    return changed


def apply_lora(net: PreTrainedModel, lora: LoraConfig, task: Task) -> nn.Module:
    import peft  # here, not at the top: its import costs ~3 s on every worker, and full fine-tuning never needs it

    classification = task == "sequence-classification"
    targets = None if lora.target_modules == "auto" else list(lora.target_modules)
    module_names = [name for name, _ in net.named_modules()]
    # peft accepts a list where only some names match; a typo would silently train fewer modules.
    missing = [t for t in targets or [] if not any(n == t or n.endswith(f".{t}") for n in module_names)]
    if missing:
        raise ModelBuildError(_target_message(net, targets, f"no module is named {', '.join(missing)}"))
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=peft.TaskType.SEQ_CLS if classification else peft.TaskType.CAUSAL_LM,
        # The freshly initialised classification head must train in full; peft only knows "classifier"/"score".
        modules_to_save=head_modules(net) if classification else None,
    )
    try:
        return peft.get_peft_model(net, config)
    except ValueError as exc:
        raise ModelBuildError(_target_message(net, lora.target_modules, str(exc))) from exc


def head_modules(net: PreTrainedModel) -> list[str]:
    """Top-level submodules with weights outside the base model: the task head (classifier, score, ...)."""
    return [
        name
        for name, child in net.named_children()
        if name != net.base_model_prefix and next(child.parameters(), None) is not None
    ]


def freeze(net: nn.Module, spec: FreezeConfig) -> None:
    """requires_grad=False for the embeddings and/or the lowest `spec.layers` blocks; the head is never frozen.

    A tied lm_head (GPT-2) is the embedding matrix itself, so it freezes with the embeddings.
    """
    total = num_layers(net)
    if spec.layers > total:
        raise ModelBuildError(f"finetune.freeze.layers is {spec.layers} but the model has only {total} layers")
    frozen = {f"layer.{i}" for i in range(spec.layers)} | ({"embeddings"} if spec.embeddings else set())
    labels = layer_of(net)
    for name, param in net.named_parameters():
        if labels[name] in frozen:
            param.requires_grad_(False)


def merge_for_export(model: nn.Module, copy_first: bool = True) -> PreTrainedModel:
    """A plain PreTrainedModel to save_pretrained: LoRA weights merged into the base, or the model itself.

    Merging rewrites the base weights, so by default it merges a copy and the model can keep training;
    copy_first=False merges in place and saves the memory of a second model (only at the very end).
    """
    peft = sys.modules.get("peft")  # only a process that applied LoRA has imported it
    if peft is not None and isinstance(model, peft.PeftModel):
        return (copy.deepcopy(model) if copy_first else model).merge_and_unload()
    return model


def _ensure_pad_token(config: PretrainedConfig, ref: str, classification: bool) -> None:
    # Llama/GPT-2 ship without a pad token; batched classification pools the last non-pad token, so it needs
    # one. load_tokenizer pads with EOS for the same reason, so the two agree.
    if getattr(config, "pad_token_id", None) is not None:
        return
    eos = getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is not None:
        config.pad_token_id = eos
    elif classification:
        raise ModelBuildError(
            f"model.name_or_path: '{ref}' has neither pad_token_id nor eos_token_id in its config, so batched "
            "sequence classification cannot tell padding from text"
        )


def _label_kwargs(num_labels: int | None, label_names: list[str] | None) -> dict:
    if label_names is None and num_labels is None:
        return {}
    names = label_names if label_names is not None else [str(i) for i in range(num_labels)]
    if num_labels is not None and num_labels != len(names):
        raise ModelBuildError(f"num_labels is {num_labels} but label_names has {len(names)} entries")
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


def _target_message(net: nn.Module, asked: list[str] | str | None, why: str) -> str:
    # Suggest the leaf names LoRA can wrap (linear layers), in model order.
    leaves = dict.fromkeys(
        name.rsplit(".", 1)[-1] for name, m in net.named_modules() if isinstance(m, (nn.Linear, Conv1D))
    )
    return (
        f"finetune.lora.target_modules: {asked or 'auto'} cannot be applied to this "
        f"{getattr(net.config, 'model_type', 'model')}: {why.rstrip('.')}. "
        f"Linear modules it has: {', '.join(list(leaves)[:10])}"
    )
