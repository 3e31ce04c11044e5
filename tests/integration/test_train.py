"""The fine-tuning engine on a real local Ray with real DeepSpeed (gloo) and a tiny 2-layer BERT.

One baseline run (2 workers, ZeRO-2) is shared: other runs must reproduce its loss curve (1 worker, ZeRO-3),
its final metrics after a killed worker, after an interrupted-and-resumed run, and after a resume that has to
skip a corrupted checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raytune_ft.config.loader import validate_raw
from raytune_ft.train import CheckpointError, train, verify_checkpoint
from raytune_ft.train.checkpoint import TRAINABLE, list_checkpoints

pytestmark = pytest.mark.integration


def write_reviews(path: Path, rows: int = 160) -> Path:
    """A learnable toy task: label 1 iff the review says 'good'; a source column gives two slices."""
    rng = random.Random(0)
    lines = ["text\tlabel\tsource"]
    for i in range(rows):
        label = i % 2
        words = [rng.choice(["the", "a", "film", "movie", "is", "review", "number"]) for _ in range(rng.randint(3, 7))]
        words.insert(rng.randint(0, len(words)), "good" if label else "bad")
        lines.append(f"{' '.join(words)} {i}\t{label}\t{'web' if i % 3 else 'print'}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    return write_reviews(tmp_path_factory.mktemp("data") / "reviews.tsv")


def make_cfg(root: Path, name: str, model: Path, data: Path, **sections):
    raw = {
        "name": name,
        "seed": 7,
        "output_dir": str(root),
        "model": {"name_or_path": str(model), "task": "sequence-classification"},
        "data": {
            "path": str(data),
            "max_length": 16,
            "columns": {"slice": "source"},
            "split": {"validation": 0.2, "test": 0.1},
        },
        "deepspeed": {"zero_stage": 2},
        "train": {
            "lr": 1e-2,
            "batch_size": 4,
            "epochs": 5,
            "max_steps": 24,
            "eval_every_steps": 6,
            "checkpoint_every_steps": 6,
            "keep_checkpoints": 8,
            "warmup_ratio": 0.1,
        },
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return validate_raw(raw, None, "test.yaml", [], base_dir=root)


def curve(result) -> list[float]:
    return [round(h["eval_loss"], 6) for h in result.history]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_bert, reviews, local_ray):
    root = tmp_path_factory.mktemp("runs")
    return train(make_cfg(root, "baseline", tiny_bert, reviews)), root


def test_baseline_learns_checkpoints_and_exports(baseline, tiny_bert):
    result, _ = baseline
    steps = [h["step"] for h in result.history]
    assert steps == [6, 12, 18, 24]
    assert result.history[-1]["eval_loss"] < result.history[0]["eval_loss"]
    assert result.history[-1]["eval_accuracy"] > 0.6  # the toy task is learnable in 24 steps
    for key in ("eval_accuracy", "eval_f1_macro", "eval_loss", "eval_precision/0", "eval_recall/1"):
        assert key in result.metrics
    # per-slice metrics, computed from all workers' predictions
    assert {"eval_slice/web/accuracy", "eval_slice/print/f1_macro", "eval_slice_f1_gap"} <= set(result.metrics)
    slice_f1 = [result.metrics["eval_slice/web/f1_macro"], result.metrics["eval_slice/print/f1_macro"]]
    assert result.metrics["eval_worst_slice_f1"] == min(slice_f1)
    assert result.metrics["eval_slice_f1_gap"] == pytest.approx(max(slice_f1) - min(slice_f1))
    checkpoints = list_checkpoints(result.run_dir / "train")
    assert [c.name for c in checkpoints] == ["step_000006", "step_000012", "step_000018", "step_000024"]
    state = verify_checkpoint(checkpoints[-1])
    assert state["step"] == 24 and state["world_size"] == 2

    # export -> reload -> the logits the training model produced at that step
    from transformers import AutoModelForSequenceClassification

    meta = json.loads((result.export_dir / "raytune_ft.json").read_text())
    assert meta["reload_check"]["max_abs_logit_diff"] < 1e-4
    assert meta["provenance"]["data"]["sha256"] and meta["provenance"]["packages"]["deepspeed"]
    assert (result.export_dir / "model.safetensors").is_file()
    # the model card: base model, data hash, the hyper-parameters, the validation metrics, how to reproduce
    card = (result.export_dir / "README.md").read_text()
    for field in (str(tiny_bert), meta["provenance"]["data"]["sha256"], "| train.lr | 0.01 |", "| accuracy |"):
        assert field in card, field
    assert "raytune-ft train experiment.yaml" in card and (result.export_dir / "experiment.yaml").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(result.export_dir).eval()
    probe = load_file(str(result.best_checkpoint / "probe_logits.safetensors"))["logits"]
    from raytune_ft.train.trainer import prepare_worker_data

    cfg = make_cfg(result.run_dir.parent, "baseline", tiny_bert, Path(meta["provenance"]["data"]["path"]))
    val = prepare_worker_data(cfg)["data"]["validation"]
    from raytune_ft.train.batches import collate

    batch = collate(val, list(range(probe.shape[0])), 0, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(logits, probe, atol=1e-5)


def test_one_worker_and_zero3_follow_the_same_loss_curve(baseline, tiny_bert, reviews):
    _, root = baseline
    # Dropout off: with it, 1 worker and 2 workers draw different masks and the curves part for that reason alone.
    no_dropout = {"dropout": 0.0}
    zero2 = train(make_cfg(root, "zero2", tiny_bert, reviews, finetune=no_dropout), export=False)
    single = train(
        make_cfg(
            root,
            "one-worker",
            tiny_bert,
            reviews,
            finetune=no_dropout,
            train={"batch_size": 8},
            scaling={"num_workers": 1},
        ),
        export=False,
    )
    zero3 = train(
        make_cfg(root, "zero3", tiny_bert, reviews, finetune=no_dropout, deepspeed={"zero_stage": 3}), export=False
    )
    # ZeRO-3 with optimizer and parameters offloaded to CPU (DeepSpeedCPUAdam, compiled on first use: about a
    # minute once per machine) does the same arithmetic on one worker, and its export is consolidated
    offload = train(
        make_cfg(
            root,
            "offload",
            tiny_bert,
            reviews,
            finetune=no_dropout,
            deepspeed={"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
            train={"batch_size": 8},
            scaling={"num_workers": 1},
        )
    )
    assert curve(single) == pytest.approx(curve(zero2), abs=2e-4)
    assert curve(zero3) == pytest.approx(curve(zero2), abs=2e-4)
    assert curve(offload) == pytest.approx(curve(zero2), abs=2e-4)
    assert curve(zero2)[-1] < curve(zero2)[0] - 0.03  # and that curve does go down
    meta = json.loads((offload.export_dir / "raytune_ft.json").read_text())
    assert meta["reload_check"]["max_abs_logit_diff"] < 1e-4


def test_killed_worker_is_replaced_and_run_ends_the_same(baseline, tiny_bert, reviews, tmp_path):
    result, root = baseline
    cfg = make_cfg(root, "killed", tiny_bert, reviews)
    marker = tmp_path / "killed.txt"
    killed = train(cfg, export=False, fault={"kill_at_step": 14, "rank": 1, "marker": str(marker)})
    assert marker.exists(), "the fault hook must really have killed a worker"
    assert [h["resumed_step"] for h in killed.history if "resumed_step" in h] == [12]  # not a restart from 0
    assert curve(killed) == pytest.approx(curve(result), abs=1e-5)
    assert killed.history[-1]["eval_accuracy"] == result.history[-1]["eval_accuracy"]


def test_worker_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(baseline, tiny_bert, reviews, tmp_path):
    """Rank 1 is SIGKILLed after writing its checkpoint files but before its manifest: step 12 is never whole, so
    Ray Train restarts the workers from step 6 and the run still ends exactly like the baseline."""
    result, root = baseline
    cfg = make_cfg(root, "killed-in-checkpoint", tiny_bert, reviews)
    marker = tmp_path / "killed.txt"
    killed = train(cfg, export=False, fault={"kill_in_checkpoint_at_step": 12, "rank": 1, "marker": str(marker)})
    assert "while writing checkpoint 12" in marker.read_text()
    resumes = [h["resumed_step"] for h in killed.history if "resumed_step" in h]
    assert resumes == [6], "training must restart from the last whole checkpoint, never the half-written one"
    assert curve(killed) == pytest.approx(curve(result), abs=1e-5)
    assert killed.history[-1]["eval_accuracy"] == result.history[-1]["eval_accuracy"]
    for checkpoint in list_checkpoints(root / "killed-in-checkpoint" / "train"):
        verify_checkpoint(checkpoint)  # what is left on disk is whole: step 12 was written again, in full


def test_interrupted_run_resumes_to_the_same_end(baseline, tiny_bert, reviews):
    result, root = baseline
    cfg = make_cfg(root, "resumed", tiny_bert, reviews, train={"max_failures": 0})
    with pytest.raises(Exception, match="interrupted at step 14"):
        train(cfg, export=False, fault={"raise_at_step": 14})
    assert [c.name for c in list_checkpoints(root / "resumed" / "train")][-1] == "step_000012"
    with pytest.raises(CheckpointError, match="already holds a training run"):
        train(cfg, export=False)
    resumed = train(cfg, resume=True, export=False)
    assert curve(resumed) == pytest.approx(curve(result), abs=1e-5)


def test_rerunning_a_finished_run_reuses_it(baseline, tiny_bert, reviews):
    result, root = baseline
    again = train(make_cfg(root, "baseline", tiny_bert, reviews))
    assert again.export_dir == result.export_dir
    assert curve(again) == curve(result)


def test_resume_skips_a_corrupted_newest_checkpoint(baseline, tiny_bert, reviews):
    result, root = baseline
    shutil.copytree(root / "baseline", root / "corrupt")
    newest = list_checkpoints(root / "corrupt" / "train")[-1]
    target = newest / TRAINABLE
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checkpoint(newest)
    cfg = make_cfg(root, "corrupt", tiny_bert, reviews)
    resumed = train(cfg, resume=True, export=False)
    assert curve(resumed) == pytest.approx(curve(result), abs=1e-5)


def test_resume_without_checkpoint_is_an_error(tiny_bert, reviews, tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(make_cfg(tmp_path, "empty", tiny_bert, reviews), resume=True)


def test_lora_changes_only_adapters_and_partial_keeps_frozen_layers(baseline, tiny_bert, reviews):
    _, root = baseline
    base = load_file(str(tiny_bert / "model.safetensors"))
    lora = train(
        make_cfg(
            root,
            "lora",
            tiny_bert,
            reviews,
            finetune={"method": "lora", "lora": {"r": 4}},
            scaling={"num_workers": 1},
            train={"batch_size": 8},
        ),
    )
    trainable = load_file(str(lora.best_checkpoint / TRAINABLE))
    assert trainable and all("lora_" in k or "classifier" in k for k in trainable)
    merged = load_file(str(lora.export_dir / "model.safetensors"))
    changed = {k for k in base if k in merged and not torch.equal(base[k], merged[k])}
    assert changed and all(
        ("query" in k or "value" in k) and k.endswith("weight") or "classifier" in k for k in changed
    ), changed

    partial = train(
        make_cfg(
            root,
            "partial",
            tiny_bert,
            reviews,
            finetune={"method": "partial", "freeze": {"embeddings": True, "layers": 1}},
            scaling={"num_workers": 1},
            train={"batch_size": 8},
        ),
    )
    exported = load_file(str(partial.export_dir / "model.safetensors"))
    frozen = [k for k in base if "embeddings" in k or ".layer.0." in k]
    assert frozen and all(torch.equal(base[k], exported[k]) for k in frozen)
    assert any(not torch.equal(base[k], exported[k]) for k in base if ".layer.1." in k)


def test_causal_lm_with_zero3_trains_and_exports(tiny_llama, tmp_path, local_ray):
    text = "\n\n".join(f"the film number {i} is good. the movie is not bad. a review is a review." for i in range(80))
    (tmp_path / "corpus.txt").write_text(text + "\n")
    raw = {
        "name": "lm",
        "seed": 1,
        "output_dir": str(tmp_path),
        "model": {"name_or_path": str(tiny_llama), "task": "causal-lm"},
        "data": {"path": "corpus.txt", "block_size": 16, "split": {"validation": 0.1, "test": 0.1}},
        "deepspeed": {"zero_stage": 3},
        "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 6, "eval_every_steps": 3},
        "scaling": {"num_workers": 2},
    }
    result = train(validate_raw(raw, None, "t.yaml", [], base_dir=tmp_path))
    first, last = result.history[0], result.history[-1]
    assert 1 < last["eval_perplexity"] < first["eval_perplexity"]
    meta = json.loads((result.export_dir / "raytune_ft.json").read_text())
    assert meta["task"] == "causal-lm" and meta["reload_check"]["max_abs_logit_diff"] < 1e-4
