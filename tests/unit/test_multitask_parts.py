"""The parts of multi-task fine-tuning: task sampling by hand, and the shared-backbone model on tiny models."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from modeling_fixtures import VOCAB, finetune_cfg, model_cfg, save_tiny_bert, save_tiny_llama, token_batch

from raytune_ft.modeling import build_model
from raytune_ft.modeling.multitask import MultiTaskModel, TaskHead, backbone_of, pool
from raytune_ft.train.batches import StepPlan
from raytune_ft.train.task_mix import TaskMix, TaskStream, task_at, task_schedule, task_weights


def test_task_weights_proportional_uniform_and_temperature():
    sizes = {"big": 900, "small": 100}
    assert task_weights(sizes, "proportional") == pytest.approx({"big": 0.9, "small": 0.1})
    assert task_weights(sizes, "uniform") == pytest.approx({"big": 0.5, "small": 0.5})
    # T=2: sqrt(900)=30, sqrt(100)=10 -> 0.75 / 0.25, between proportional and uniform
    assert task_weights(sizes, "temperature", 2.0) == pytest.approx({"big": 0.75, "small": 0.25})
    assert task_weights(sizes, "temperature", 1.0) == pytest.approx(task_weights(sizes, "proportional"))
    with pytest.raises(ValueError, match="sampling must be one of"):
        task_weights(sizes, "roundrobin")
    with pytest.raises(ValueError, match="every task needs training rows"):
        task_weights({"a": 0}, "uniform")
    with pytest.raises(ValueError, match="temperature must be >= 1"):
        task_weights(sizes, "temperature", 0.5)


def test_the_task_of_a_step_is_the_same_everywhere_and_follows_the_weights():
    weights = {"a": 0.75, "b": 0.25}
    plan = task_schedule(4000, weights, seed=7)
    # what a worker (or a run resumed at step 1000) draws for a step is what the schedule says
    assert [task_at(s, weights, 7) for s in range(1000, 1010)] == plan[1000:1010]
    assert [task_at(s, dict(reversed(weights.items())), 7) for s in range(10)] == plan[:10]  # dict order moot
    counts = Counter(plan)
    assert counts["a"] / 4000 == pytest.approx(0.75, abs=0.03)
    assert task_schedule(50, weights, seed=8) != plan[:50]


def test_encoder_heads_share_the_backbone_and_the_primary_task_is_the_plain_model(tmp_path):
    folder = save_tiny_bert(tmp_path / "bert")
    torch.manual_seed(0)
    primary = build_model(model_cfg(folder), finetune_cfg(), num_labels=2)
    model = MultiTaskModel(primary, "sentiment", [TaskHead("topic", "sequence-classification", 3)]).eval()
    batch = token_batch()
    mask = batch["attention_mask"]
    with torch.no_grad():
        main = model(batch["input_ids"], mask, task="sentiment").logits
        assert torch.equal(main, primary(input_ids=batch["input_ids"], attention_mask=mask).logits)
        topic = model(batch["input_ids"], mask, task="topic").logits
        hidden = backbone_of(primary)(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        assert topic.shape == (4, 3)
        assert torch.allclose(topic, model.heads["topic"](hidden[:, 0]))  # BERT: pooled at [CLS]
    # the extra task's loss trains the shared encoder and its own head, not the primary's classifier
    model.train()
    loss = torch.nn.functional.cross_entropy(
        model(batch["input_ids"], mask, task="topic").logits, torch.tensor([0, 1, 2, 0])
    )
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "heads.topic.weight" in grads and any(".encoder.layer.0." in n for n in grads)
    assert not any(n.startswith("primary.classifier") for n in grads)
    assert set(model.head_state()) == {"topic.weight", "topic.bias"}


def test_with_lora_only_adapters_and_heads_train(tmp_path):
    folder = save_tiny_bert(tmp_path / "bert")
    lora = finetune_cfg(method="lora", lora={"r": 4, "target_modules": ["query", "value"]})
    model = MultiTaskModel(
        build_model(model_cfg(folder), lora, num_labels=2), "main", [TaskHead("t", "sequence-classification", 2)]
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "heads.t.weight" in trainable and any("lora_A" in n for n in trainable)
    assert not any("attention.self.key" in n for n in trainable)  # frozen base weights stay frozen
    batch = token_batch()
    assert model(batch["input_ids"], batch["attention_mask"], task="t").logits.shape == (4, 2)


def test_decoder_heads_read_the_last_real_token_and_lm_tasks_share_the_lm_head(tmp_path):
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert pool(hidden, mask, decoder=True).flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, mask, decoder=False).flatten().tolist() == [0.0, 4.0]

    folder = save_tiny_llama(tmp_path / "llama")
    primary = build_model(model_cfg(folder, "causal-lm"), finetune_cfg())
    heads = [TaskHead("sentiment", "sequence-classification", 2), TaskHead("poems", "causal-lm")]
    model = MultiTaskModel(primary, "stories", heads).eval()
    assert model.decoder and set(model.heads) == {"sentiment"}
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert model(ids, mask, task="poems").logits.shape == (2, 6, VOCAB)  # the shared LM head
        assert model(ids, mask, task="sentiment").logits.shape == (2, 2)


def plan_of(n: int, seed: int = 0) -> StepPlan:
    return StepPlan(n_train=n, micro_batch=2, world_size=2, grad_accum=1, epochs=100, max_steps=None, seed=seed)


def stream(name, n, seed=0) -> TaskStream:
    return TaskStream(name, plan_of(n, seed), {}, {}, loss=lambda engine, batch: None)


def test_one_task_steps_exactly_as_its_plan_does():
    only = stream(None, 12)
    mix = TaskMix(only, [], total=9, sampling="proportional", temperature=2.0, seed=5)
    for step in range(9):  # across the epoch boundary at step 3
        for rank in range(2):
            got, rows = mix.step(step, rank)
            assert got is only and rows == only.plan.micro_batches(step, rank)


def test_each_task_walks_through_its_own_rows_in_its_own_epochs():
    main, other = stream("main", 40), stream("other", 8, seed=1)
    mix = TaskMix(main, [other], total=60, sampling="uniform", temperature=2.0, seed=3)
    assert mix.weights == {"main": 0.5, "other": 0.5}
    seen = {"main": 0, "other": 0}
    for step in range(60):
        got, rows = mix.step(step, rank=1)
        name = mix.schedule[step]
        assert got.name == name
        # the k-th step of a task is that task's own step k: its epochs roll over by its own size
        assert rows == got.plan.micro_batches(seen[name], 1)
        seen[name] += 1
    assert seen["other"] > 2 * other.plan.steps_per_epoch  # the small task went round several epochs


def test_layerwise_groups_and_gradual_unfreezing_see_the_heads_as_heads(tmp_path):
    from raytune_ft.config.schema import GradualUnfreezeConfig
    from raytune_ft.modeling import num_layers, param_groups, unfreeze_gate

    folder = save_tiny_bert(tmp_path / "bert")
    model = MultiTaskModel(
        build_model(model_cfg(folder), finetune_cfg(), num_labels=2),
        "main",
        [TaskHead("t", "sequence-classification", 3)],
    )
    assert num_layers(model) == 2  # the backbone's blocks, found through the wrapper
    groups = param_groups(model, lr=1e-3, weight_decay=0.01, layerwise_lr_decay=0.5)
    head = [g for g in groups if g["group"] == "head"]
    head_params = {id(p) for g in head for p in g["params"]}
    assert id(model.heads["t"].weight) in head_params and all(g["lr"] == 1e-3 for g in head)
    assert {g["group"] for g in groups} == {"embeddings", "layer.0", "layer.1", "head"}
    gate = unfreeze_gate(GradualUnfreezeConfig(every_steps=10), num_layers(model))
    assert gate("head", 0) == 1.0 and gate("layer.0", 0) == 0.0  # the task heads train from the first step


def test_the_primary_loss_weight_is_searched_and_perturbed_like_any_key(tmp_path):
    from raytune_ft.config.loader import validate_raw
    from raytune_ft.tune.space import trial_experiment

    folder = save_tiny_bert(tmp_path / "bert")
    raw = {
        "name": "mt",
        "model": {"name_or_path": str(folder), "task": "sequence-classification"},
        "data": {"path": str(tmp_path / "d.tsv")},
        "train": {"max_steps": 8, "checkpoint_every_steps": 4},
        "tasks": [{"name": "topic", "data": {"path": str(tmp_path / "t.tsv")}}],
        "tune": {
            "algorithm": "pbt",
            "perturbation_interval": 4,
            "metric": "eval_combined_loss",
            "search_space": {"multitask.primary_loss_weight": {"type": "uniform", "low": 0.5, "high": 2.0}},
        },
    }
    cfg = validate_raw(raw, None, "mt.yaml", [], base_dir=tmp_path)
    trial = trial_experiment(cfg.model_dump(mode="json", by_alias=True), {"multitask.primary_loss_weight": 1.7}, "t")
    assert trial.multitask.primary_loss_weight == 1.7 and trial.tasks[0].name == "topic"
