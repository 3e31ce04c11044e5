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


CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<pad>"]


def chat_tokenizer() -> Any:
    """A byte-level tokenizer built in memory (no download): the 256 byte tokens without merges, so any text
    tokenizes and a token is one byte, plus ChatML's markers and a pad token as special tokens (ids 256, 257, 258
    in that order), with the ChatML template set. Deterministic, and it round-trips through save_pretrained and
    AutoTokenizer.from_pretrained; pair it with llama_config(len(tokenizer)) for a tiny chat model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from raytune_ft.data.chat_templates import CHATML

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok)
    wrapped.add_special_tokens({"additional_special_tokens": CHAT_SPECIAL_TOKENS})
    wrapped.eos_token, wrapped.pad_token = "<|im_end|>", "<pad>"
    wrapped.chat_template = CHATML
    return wrapped
