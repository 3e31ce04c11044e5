"""Integration fixtures: a real local Ray cluster and tiny real Hugging Face model directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *_CHARS,
    *".,!?'",
    *(f"##{c}" for c in _CHARS),
    "good",
    "bad",
    "movie",
    "film",
    "review",
    "number",
    "is",
    "the",
    "not",
]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT with hidden size 32, saved like any checkpoint users load with from_pretrained."""
    import torch
    from tiny_models import bert_config
    from transformers import BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)  # the same starting weights every session: tests assert what training reaches from them
    BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}).save_pretrained(folder)
    config = bert_config(len(VOCAB), max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from raytune_ft.train.ray_cluster import inherited_environment, start_embedded_ray

    # Workers import test modules (loop functions live there) the way pytest does: by file name.
    here = str(Path(__file__).parent)
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    with inherited_environment({"PYTHONPATH": path}):
        start_embedded_ray(num_cpus=2, log_to_driver=False)  # as `raytune-ft` starts it
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) for causal LM, with the tiny word-piece tokenizer."""
    import torch
    from tiny_models import llama_config
    from transformers import BertTokenizerFast, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}).save_pretrained(folder)
    config = llama_config(len(VOCAB), pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
