"""The engine settings of `train` on tiny 2-layer Llamas, without Ray or DeepSpeed: activation checkpointing
gives the same gradients as keeping activations, the AdamW kernel follows train.fused_adamw, the attention kernel
follows model.attn_implementation, and the parameter counts MFU is computed from."""

from __future__ import annotations

import pytest
import torch
from test_train_parts import cfg_with
from tiny_models import llama_config
from transformers import LlamaForCausalLM

from raytune_ft.config.loader import ConfigError
from raytune_ft.config.schema import FinetuneConfig, ModelConfig
from raytune_ft.modeling import build_model
from raytune_ft.train.engine import enable_activation_checkpointing, make_optimizer
from raytune_ft.train.evaluate import task_loss
from raytune_ft.train.measure import model_sizes


@pytest.fixture
def tiny_llama(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(100)).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def gradients(model, batch):
    model.train()
    model.zero_grad()
    torch.manual_seed(1)  # the same LoRA dropout masks (checkpointing replays the RNG state in its recompute)
    task_loss(model, batch, classification=False, class_weights=None).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_activation_checkpointing_recomputes_to_the_same_gradients(tiny_llama, method):
    finetune = FinetuneConfig.model_validate({"method": method, "lora": {"r": 4}})
    batch = {"input_ids": torch.randint(3, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    kept = build_model(ModelConfig(name_or_path=str(tiny_llama), task="causal-lm"), finetune)
    recomputed = build_model(ModelConfig(name_or_path=str(tiny_llama), task="causal-lm"), finetune)
    recomputed.load_state_dict(kept.state_dict())  # the same LoRA initialisation on both
    enable_activation_checkpointing(recomputed)
    base = recomputed.get_base_model() if method == "lora" else recomputed
    assert base.is_activation_checkpointing and not base.config.use_cache
    expected, found = gradients(kept, batch), gradients(recomputed, batch)
    assert expected.keys() == found.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(found[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_adamw_is_fused_on_gpu_by_default_and_when_asked(tmp_path):
    groups = lambda: [{"params": [torch.nn.Parameter(torch.zeros(3))], "weight_decay": 0.0}]  # noqa: E731
    default = cfg_with(tmp_path)
    assert make_optimizer(default, groups(), on_gpu=True).defaults["fused"] is True
    on_cpu = make_optimizer(default, groups(), on_gpu=False)
    assert not on_cpu.defaults["fused"]  # PyTorch's default kernel (foreach)
    asked = cfg_with(tmp_path, train={"fused_adamw": True})
    fused = make_optimizer(asked, groups(), on_gpu=False)  # PyTorch has a fused AdamW for CPU too
    assert fused.defaults["fused"] is True
    fused.param_groups[0]["params"][0].grad = torch.ones(3)
    fused.step()  # and it runs


def test_attention_kernel_follows_the_config(tiny_llama, tmp_path):
    finetune = FinetuneConfig()
    source = {"name_or_path": str(tiny_llama), "task": "causal-lm"}
    eager = build_model(ModelConfig(**source, attn_implementation="eager"), finetune)
    assert eager.config._attn_implementation == "eager"
    auto = build_model(ModelConfig(**source), finetune)
    assert auto.config._attn_implementation == "sdpa"  # transformers' choice where the model supports it
    with pytest.raises(ConfigError) as found:
        cfg_with(
            tmp_path,
            model={"name_or_path": str(tiny_llama), "task": "causal-lm", "attn_implementation": "flash_attention_2"},
        )
    assert "model.attn_implementation" in str(found.value) and "use_gpu" in str(found.value)


def test_model_sizes_leave_embedding_tables_out_of_the_matmul_count(tiny_llama):
    model = build_model(ModelConfig(name_or_path=str(tiny_llama), task="causal-lm"), FinetuneConfig())
    sizes = model_sizes(model)
    embedding = model.get_input_embeddings().weight.numel()
    assert sizes["n_params"] == sum(p.numel() for p in model.parameters())
    assert sizes["n_matmul_params"] == sizes["n_params"] - embedding  # the untied output head stays in
    assert (sizes["n_layers"], sizes["hidden_size"]) == (2, 32)
    lora = build_model(
        ModelConfig(name_or_path=str(tiny_llama), task="causal-lm"),
        FinetuneConfig.model_validate({"method": "lora", "lora": {"r": 4}}),
    )
    found = model_sizes(lora)
    assert (
        found["n_trainable"]
        == found["n_matmul_trainable"]
        == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    )
    assert 0 < found["n_trainable"] < found["n_matmul_params"]


def test_a_serving_replica_runs_half_precision_on_a_gpu_and_fp32_on_cpu():
    from raytune_ft.serve.model import serving_dtype

    cpu = torch.device("cpu")
    assert {serving_dtype(s, cpu) for s in ("auto", "bf16", "fp16", "fp32")} == {torch.float32}
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        assert serving_dtype("fp16", gpu) == torch.float16 and serving_dtype("fp32", gpu) == torch.float32
        assert serving_dtype("auto", gpu) in (torch.bfloat16, torch.float16)
