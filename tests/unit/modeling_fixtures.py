"""Tiny saved checkpoints and training helpers for test_modeling.py (a plain module, not a conftest)."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import bert_config, llama_config
from torch import nn
from transformers import BertModel, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from raytune_ft.config.schema import FinetuneConfig, ModelConfig

VOCAB = 100


def save_tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT base (no task head), like a pre-trained encoder checkpoint."""
    torch.manual_seed(0)
    BertModel(bert_config(VOCAB)).save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=None)).save_pretrained(folder)
    return folder


def save_tiny_gpt2(folder: Path) -> Path:
    """GPT-2 ties lm_head to wte and has no pad token."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=3, eos_token_id=3
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def model_cfg(folder: Path, task: str = "sequence-classification") -> ModelConfig:
    return ModelConfig(name_or_path=str(folder), task=task)


def finetune_cfg(**raw: object) -> FinetuneConfig:
    return FinetuneConfig.model_validate(raw)


def token_batch(batch_size: int = 4, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Ids from 4 up stay clear of the special tokens (pad, bos/eos) of the tiny configs.
    input_ids = torch.randint(4, VOCAB, (batch_size, length), generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.arange(batch_size) % 2,
    }


def lm_batch(batch_size: int = 4, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    batch = token_batch(batch_size, length, seed)
    batch["labels"] = batch["input_ids"].clone()
    return batch


def hf_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, steps: int) -> None:
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        hf_loss(model, batch).backward()
        optimizer.step()
