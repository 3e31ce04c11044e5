"""The fine-tuning engine on a real local Ray with real DeepSpeed (gloo) and a tiny 2-layer BERT.

One baseline run (2 workers, ZeRO-2: conftest's classifier_run, whose export the serving tests serve) is shared:
other runs must reproduce its loss curve (2 workers under ZeRO-3, 1 worker with ZeRO-3 offload), its final
metrics after workers killed mid-step and mid-checkpoint, and after an interrupted run resumed past a corrupted
checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from faults import Faults
from helpers import cli, curve, make_cfg, write_experiment
from safetensors.torch import load_file

from raytune_ft.train import CheckpointError, train, verify_checkpoint
from raytune_ft.train.checkpoint import TRAINABLE, list_checkpoints, read_state

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def baseline(classifier_run):
    return classifier_run


def test_baseline_learns_checkpoints_and_exports(baseline, tiny_bert):
    result, _ = baseline
    steps = [h["step"] for h in result.history]
    assert steps == [6, 12, 18, 24]
    assert result.history[-1]["eval_loss"] < result.history[0]["eval_loss"] - 0.03
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


def test_zero3_and_one_offloaded_worker_follow_the_same_loss_curve(baseline, tiny_bert, reviews):
    result, root = baseline
    zero3 = train(make_cfg(root, "zero3", tiny_bert, reviews, deepspeed={"zero_stage": 3}), export=False)
    # One worker, the same global batch, ZeRO-3 with optimizer and parameters offloaded to CPU (DeepSpeedCPUAdam,
    # built once per machine by `make setup`): the same arithmetic, and its export is consolidated
    offload = train(
        make_cfg(
            root,
            "offload",
            tiny_bert,
            reviews,
            deepspeed={"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
            train={"batch_size": 8},
            scaling={"num_workers": 1},
        )
    )
    assert curve(zero3) == pytest.approx(curve(result), abs=2e-4)
    assert curve(offload) == pytest.approx(curve(result), abs=2e-4)
    meta = json.loads((offload.export_dir / "raytune_ft.json").read_text())
    assert meta["reload_check"]["max_abs_logit_diff"] < 1e-4
    assert verify_checkpoint(offload.best_checkpoint)["world_size"] == 1


def test_killed_workers_are_replaced_and_the_run_ends_the_same(baseline, tiny_bert, reviews, tmp_path):
    """Two faults in one run, each a SIGKILL of rank 1: while writing checkpoint 12 (its files written, its
    manifest not, so step 12 is never whole and the workers restart from step 6), then at step 20 (restart from
    18). The run still ends exactly like the baseline, and what is left on disk is whole."""
    result, root = baseline
    cfg = make_cfg(root, "killed", tiny_bert, reviews)
    marker = tmp_path / "killed"
    faults = Faults(kill_in_checkpoint_at_step=12, kill_at_step=20, rank=1, marker=str(marker))
    killed = train(cfg, export=False, hooks=[faults])
    assert "while writing checkpoint 12" in Path(f"{marker}.kill_in_checkpoint_at_step").read_text()
    assert "at step 20" in Path(f"{marker}.kill_at_step").read_text()
    # never the half-written checkpoint, and never a restart from 0
    assert [h["resumed_step"] for h in killed.history if "resumed_step" in h] == [6, 18]
    assert curve(killed) == pytest.approx(curve(result), abs=1e-5)
    assert killed.history[-1]["eval_accuracy"] == result.history[-1]["eval_accuracy"]
    for checkpoint in list_checkpoints(root / "killed" / "train"):
        verify_checkpoint(checkpoint)  # step 12 was written again, in full


def test_interrupted_run_resumes_past_a_corrupted_checkpoint_to_the_same_end(
    baseline, tiny_bert, reviews, session_ray_address
):
    """An exception at step 14 (no retries) leaves checkpoints 6 and 12; a fresh run in that directory is refused;
    the newest checkpoint is then truncated, and `train --resume` skips it for step 6 and ends like the baseline."""
    result, root = baseline
    cfg = make_cfg(root, "resumed", tiny_bert, reviews, train={"max_failures": 0})
    with pytest.raises(Exception, match="interrupted at step 14"):
        train(cfg, export=False, hooks=[Faults(raise_at_step=14)])
    checkpoints = list_checkpoints(root / "resumed" / "train")
    assert [c.name for c in checkpoints] == ["step_000006", "step_000012"]
    with pytest.raises(CheckpointError, match="already holds a training run"):
        train(cfg, export=False)
    target = checkpoints[-1] / TRAINABLE
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checkpoint(checkpoints[-1])
    # `raytune-ft train --resume RUN_DIR`, as a user runs it, in its own process (on the session's Ray: an embedded
    # start is test_run.py's)
    address = f"cluster.address={session_ray_address}"
    resumed = cli("train", "--resume", str(root / "resumed"), address, "--no-export", env={**os.environ})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # a quiet console: the driver's lines and each evaluation once; the workers' own lines, and Ray's, in the log
    log = root / "resumed" / "console.log"
    kept, printed = log.read_text(), resumed.stdout + resumed.stderr
    assert f"console log (Ray, DeepSpeed, transformers): {log}" in resumed.stderr
    assert "newest checkpoint is not whole" in kept or "skipping checkpoint step_000012" in resumed.stderr
    for step in (12, 18, 24):
        assert printed.count(f"step {step}/24 | train_loss") == 1, printed[-3000:]
        assert kept.count(f"[raytune-ft rank 0] step {step}/24 | train_loss") == 1, kept[-3000:]
    assert "RayTrainWorker pid=" in kept and "RayTrainWorker" not in printed and "[raytune-ft rank" not in printed
    history = read_state(list_checkpoints(root / "resumed" / "train")[-1])["history"]
    assert [h["resumed_step"] for h in history if "resumed_step" in h] == [6]
    assert [round(h["eval_loss"], 6) for h in history] == pytest.approx(curve(result), abs=1e-5)


def test_rerunning_a_finished_run_reuses_it(baseline, tiny_bert, reviews, tmp_path):
    result, root = baseline
    cfg = make_cfg(root, "baseline", tiny_bert, reviews)
    again = train(cfg)
    assert again.export_dir == result.export_dir
    assert curve(again) == curve(result)
    # `raytune-ft train EXPERIMENT`, as a user runs it: the finished run is reused, its export printed
    done = cli("train", str(write_experiment(tmp_path / "baseline.yaml", cfg)), env={**os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already finished training" in done.stderr and "reusing it" in done.stderr
    assert f"export: {result.export_dir}" in done.stdout.replace("\n", "")


def test_train_resume_of_a_run_without_a_checkpoint_is_refused(tiny_bert, reviews, tmp_path):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    write_experiment(run_dir / "config.yaml", make_cfg(tmp_path, "empty", tiny_bert, reviews))
    refused = cli("train", "--resume", str(run_dir), env={**os.environ})
    assert refused.returncode == 1 and "nothing to resume" in refused.stderr, refused.stderr[-2000:]


def test_lora_changes_only_adapters_and_partial_keeps_frozen_layers(baseline, tiny_bert, reviews):
    _, root = baseline
    base = load_file(str(tiny_bert / "model.safetensors"))
    one_worker = {"scaling": {"num_workers": 1}, "train": {"batch_size": 8, "max_steps": 6}}
    lora = train(
        make_cfg(root, "lora", tiny_bert, reviews, finetune={"method": "lora", "lora": {"r": 4}}, **one_worker)
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
            **one_worker,
        ),
    )
    exported = load_file(str(partial.export_dir / "model.safetensors"))
    frozen = [k for k in base if "embeddings" in k or ".layer.0." in k]
    assert frozen and all(torch.equal(base[k], exported[k]) for k in frozen)
    assert any(not torch.equal(base[k], exported[k]) for k in base if ".layer.1." in k)


def test_causal_lm_with_zero3_trains_and_exports(lm_run):
    result, _ = lm_run
    first, last = result.history[0], result.history[-1]
    assert [h["step"] for h in result.history] == [3, 6]
    assert 1 < last["eval_perplexity"] < first["eval_perplexity"]
    meta = json.loads((result.export_dir / "raytune_ft.json").read_text())
    assert meta["task"] == "causal-lm" and meta["reload_check"]["max_abs_logit_diff"] < 1e-4
    assert verify_checkpoint(result.best_checkpoint)["world_size"] == 2
