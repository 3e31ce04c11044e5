"""One shared backbone, one head per task: the model of a multi-task experiment.

The experiment's own task keeps the Hugging Face model it would have alone (its classification head, or its LM
head for causal LM), so a multi-task export is still a plain `from_pretrained` model for that task. Every other
classification task gets a linear head on the backbone's last hidden state, pooled at the first token for an
encoder (BERT's [CLS]) and at the last real token for a decoder (as LlamaForSequenceClassification does). An
extra causal-LM task shares the LM head of a causal-LM primary. LoRA adapters, frozen layers and ZeRO shard the
backbone as they do without the wrapper: the heads are ordinary trainable parameters next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from raytune_ft.config.schema import CAUSAL_TASKS

HEADS_FILE = "task_heads.safetensors"
TASKS_FILE = "tasks.json"


@dataclass(frozen=True)
class TaskHead:
    name: str
    task: str  # sequence-classification | causal-lm
    num_labels: int | None = None


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer under the task head (bert, model, transformer, ...), through a peft wrapper."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf, hf.base_model_prefix)


def is_decoder(model: nn.Module) -> bool:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return not getattr(hf.config, "is_encoder_decoder", False) and hf.config.model_type not in ENCODERS


# encoders pool at [CLS]; everything else reads the last real token
ENCODERS = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta", "mpnet"}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, decoder: bool) -> torch.Tensor:
    """[batch, hidden]: the first token's state (encoder) or the last non-padding token's (decoder, right padding)."""
    if not decoder:
        return hidden[:, 0]
    last = attention_mask.long().sum(dim=1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class MultiTaskModel(nn.Module):
    """`forward(input_ids, attention_mask, task=None)`: the primary model's output for the primary task (or None),
    an object with `.logits` [batch, num_labels] for an extra classification task."""

    def __init__(self, primary: nn.Module, primary_name: str, heads: list[TaskHead]) -> None:
        super().__init__()
        self.primary = primary
        self.primary_name = primary_name
        self.tasks = {h.name: h for h in heads}
        self.decoder = is_decoder(primary)
        hidden = _hidden_size(primary)
        self.heads = nn.ModuleDict(
            {h.name: nn.Linear(hidden, h.num_labels) for h in heads if h.task == "sequence-classification"}
        )
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=0.02)  # as transformers initialises a fresh classifier
            nn.init.zeros_(head.bias)

    @property
    def config(self) -> Any:
        return self.primary.config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None, **inputs: Any
    ) -> Any:
        # INPUTS: what a packed chat batch adds for the primary model (position_ids, use_cache)
        if task is None or task == self.primary_name or self.tasks[task].task in CAUSAL_TASKS:
            return self.primary(input_ids=input_ids, attention_mask=attention_mask, **inputs)
        hidden = backbone_of(self.primary)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return SimpleNamespace(logits=self.heads[task](pool(hidden, attention_mask, self.decoder)))

    def head_state(self) -> dict[str, torch.Tensor]:
        """The extra heads' weights, keyed `<task>.weight` / `<task>.bias`, as the export saves them."""
        return {
            f"{name}.{k}": v.detach().float().cpu().clone()
            for name, h in self.heads.items()
            for k, v in h.state_dict().items()
        }


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"cannot tell the hidden size of a {config.model_type} model for its task heads")
