"""Configs of the tiny 2-layer models every test builds (hidden size 32), shared by unit and integration tests."""

from __future__ import annotations

from typing import Any

from transformers import BertConfig, LlamaConfig

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def bert_config(vocab_size: int, **overrides: Any) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, **{**TINY, "max_position_embeddings": 64, **overrides})


def llama_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, **{**TINY, "num_key_value_heads": 2, "max_position_embeddings": 64, **overrides}
    )
