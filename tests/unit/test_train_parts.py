"""Training-engine parts that need no Ray: DeepSpeed JSON, batch plan, LR schedule, early stopping, manifests."""

from __future__ import annotations

import json

import pytest
import torch

from raytune_ft.config.loader import validate_raw
from raytune_ft.train.batches import StepPlan, collate
from raytune_ft.train.checkpoint import (
    CheckpointError,
    newest_whole_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from raytune_ft.train.ds_config import deepspeed_config, resolved_precision
from raytune_ft.train.loop import progress_line
from raytune_ft.train.schedule import EarlyStopping, lr_factor


def cfg_with(tmp_path, **sections):
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text("{}")
    raw = {"name": "x", "model": {"name_or_path": str(tmp_path / "m"), "task": "causal-lm"}, "data": {"path": "d.txt"}}
    raw.update(sections)
    return validate_raw(raw, None, "t.yaml", [], base_dir=tmp_path)


def test_deepspeed_json_follows_the_config(tmp_path):
    cfg = cfg_with(
        tmp_path,
        deepspeed={
            "zero_stage": 3,
            "offload_optimizer": True,
            "offload_params": True,
            "overrides": {"zero_optimization": {"reduce_bucket_size": 1000}, "communication_data_type": "fp32"},
        },
        train={"batch_size": 8, "grad_accum": 4, "grad_clip": 0.5},
    )
    ds = deepspeed_config(cfg, "fp32")
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000  # overrides merge into nested sections
    assert ds["communication_data_type"] == "fp32"
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert deepspeed_config(cfg, "bf16")["bf16"]["enabled"]


def test_precision_is_fp32_on_cpu_and_explicit_values_win(tmp_path):
    assert resolved_precision(cfg_with(tmp_path), cuda_available=False) == "fp32"
    gpu = cfg_with(tmp_path, scaling={"use_gpu": True}, deepspeed={"precision": "fp16"})
    assert resolved_precision(gpu, cuda_available=True) == "fp16"


def test_same_rows_per_step_whatever_the_worker_count():
    one = StepPlan(n_train=40, micro_batch=8, world_size=1, grad_accum=1, epochs=2, max_steps=None, seed=3)
    two = StepPlan(n_train=40, micro_batch=4, world_size=2, grad_accum=1, epochs=2, max_steps=None, seed=3)
    acc = StepPlan(n_train=40, micro_batch=2, world_size=2, grad_accum=2, epochs=2, max_steps=None, seed=3)
    assert one.total_steps == two.total_steps == acc.total_steps == 10
    for step in range(one.total_steps):
        rows = sorted(one.micro_batches(step, 0)[0])
        assert sorted(two.micro_batches(step, 0)[0] + two.micro_batches(step, 1)[0]) == rows
        assert sorted(sum(acc.micro_batches(step, 0) + acc.micro_batches(step, 1), [])) == rows
    epoch0 = sum((one.micro_batches(s, 0)[0] for s in range(5)), [])
    assert sorted(epoch0) == list(range(40))  # each epoch reads every row once
    assert one.micro_batches(5, 0) != one.micro_batches(0, 0)  # and a new permutation per epoch


def test_group_by_length_batches_similar_lengths_in_random_order():
    import random

    rng = random.Random(0)
    lengths = tuple(int(rng.lognormvariate(2.3, 0.8)) + 2 for _ in range(2000))  # a long tail, like SST-2
    plain = StepPlan(2000, 16, 1, 1, 2, None, 5)
    grouped = StepPlan(2000, 16, 1, 1, 2, None, 5, lengths=lengths)

    def padded_tokens(plan: StepPlan, epoch: int) -> int:
        steps = range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
        return sum(len(rows) * max(lengths[r] for r in rows) for s in steps for rows in plan.micro_batches(s, 0))

    for epoch in range(2):
        rows = [r for s in range(125) for r in grouped.micro_batches(epoch * 125 + s, 0)[0]]
        assert sorted(rows) == list(range(2000))  # still every row once per epoch
        assert padded_tokens(grouped, epoch) < 0.6 * padded_tokens(plain, epoch)
    # the batches themselves come in random order (not shortest first), the same on every run and resume
    longest = [max(lengths[r] for r in grouped.micro_batches(s, 0)[0]) for s in range(125)]
    assert longest != sorted(longest)
    again = StepPlan(2000, 16, 1, 1, 2, None, 5, lengths=lengths)
    assert all(again.micro_batches(s, 0) == grouped.micro_batches(s, 0) for s in range(250))
    assert grouped.micro_batches(125, 0) != grouped.micro_batches(0, 0)


def test_whole_repeats_read_whole_rows_more_often_per_epoch(tmp_path):
    from collections import Counter

    cfg = cfg_with(
        tmp_path,
        model={"name_or_path": str(tmp_path / "m"), "task": "sequence-classification"},
        data={"path": "d.csv", "columns": {"text": "t", "label": "y"}},
        train={"batch_size": 4, "whole_repeats": 3, "group_by_length": True},
    )
    whole = [i % 4 == 0 for i in range(40)]  # rows 0, 4, ..., 36 are whole
    split = {"input_ids": [[1] * (1 + i % 7) for i in range(40)], "whole": whole}
    plan = StepPlan.of(cfg, split, world_size=1)
    assert plan.pool == 40 + 2 * 10 and plan.steps_per_epoch == 15
    read = Counter(r for s in range(15) for r in plan.micro_batches(s, 0)[0])
    assert read == Counter({i: 3 if whole[i] else 1 for i in range(40)})  # one epoch: whole rows 3 times, others once
    again = StepPlan.of(cfg, split, 1)
    assert all(plan.micro_batches(s, 0) == again.micro_batches(s, 0) for s in range(30))  # the same on a resume
    once = StepPlan.of(cfg.model_copy(update={"train": cfg.train.model_copy(update={"whole_repeats": 1})}), split, 1)
    assert once.pool == 40 and once.extra == ()


def test_plan_limits_and_too_small_data():
    assert StepPlan(100, 10, 1, 1, 3, 7, 0).total_steps == 7
    with pytest.raises(ValueError, match="fewer than one global batch of 32"):
        StepPlan(20, 8, 2, 2, 1, None, 0).check()


def test_collate_pads_and_masks():
    split = {"input_ids": [[5, 6, 7], [8]], "labels": [1, 0]}
    batch = collate(split, [0, 1], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


@pytest.mark.parametrize(
    ("step", "kind", "expected"),
    [
        (0, "linear", 0.0),
        (5, "linear", 0.5),
        (10, "linear", 1.0),
        (55, "linear", 0.5),
        (100, "linear", 0.0),
        (55, "cosine", 0.5),
        (10, "cosine", 1.0),
        (100, "cosine", 0.0),
        (70, "constant", 1.0),
    ],
)
def test_lr_schedule(step, kind, expected):
    assert lr_factor(step, total=100, warmup=10, kind=kind) == pytest.approx(expected)


def test_early_stopping_patience_and_min_delta():
    stop = EarlyStopping("max", patience=2, min_delta=0.01)
    assert [stop.update(v) for v in (0.5, 0.505, 0.6, 0.6, 0.595)] == [False, False, False, False, True]
    assert stop.best == 0.6
    again = EarlyStopping("max", 2, 0.01)
    again.restore(stop.state())
    assert again.update(0.6) is True


def make_checkpoint(path, step, world=2):
    path.mkdir()
    (path / "ds").mkdir()
    for rank in range(world):
        (path / "ds" / f"shard{rank}.pt").write_bytes(bytes([rank]) * 100)
    (path / "state.json").write_text(json.dumps({"step": step, "world_size": world}))
    # the two ranks' files were written into separate directories and merged by Ray; simulate per-rank manifests
    for rank in range(world):
        rank_dir = path.parent / f".r{rank}-{step}"
        (rank_dir / "ds").mkdir(parents=True)
        (rank_dir / "ds" / f"shard{rank}.pt").write_bytes(bytes([rank]) * 100)
        if rank == 0:
            (rank_dir / "state.json").write_text((path / "state.json").read_text())
        write_manifest(rank_dir, rank)
        (path / f"manifest.rank{rank}.json").write_text((rank_dir / f"manifest.rank{rank}.json").read_text())
    return path


def test_verify_checkpoint_and_fallback(tmp_path):
    old = make_checkpoint(tmp_path / "step_000002", 2)
    new = make_checkpoint(tmp_path / "step_000004", 4)
    assert verify_checkpoint(new)["step"] == 4
    (new / "ds" / "shard1.pt").write_bytes(b"\x01" * 50)  # truncated
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checkpoint(new)
    logged = []
    found = newest_whole_checkpoint([old, new], log=logged.append)
    assert found is not None and found[0] == old
    assert "skipping checkpoint step_000004" in logged[0]
    (old / "manifest.rank1.json").unlink()
    with pytest.raises(CheckpointError, match="write did not finish"):
        verify_checkpoint(old)


def test_progress_line_says_where_the_run_is_and_how_long_is_left():
    metrics = {"step": 300, "train_loss": 0.4512, "eval_loss": 0.33, "eval_accuracy": 0.8518, "samples_per_s": 16.0}
    line = progress_line(metrics, total=1200, global_batch=16)
    # 900 steps of 16 rows at 16 rows/s: 15 minutes
    assert (
        line
        == "step 300/1200 | train_loss 0.4512 | eval_loss 0.3300 | eval_accuracy 0.8518 | 16.0 samples/s, ETA 15.0 min"
    )
    assert "ETA" not in progress_line({"step": 1, "train_loss": 1.0}, total=2, global_batch=4)


class Planted:
    """What a tampered checkpoint file could hold: unpickling it runs a command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_checkpoint_files_are_read_weights_only_and_a_planted_pickle_never_runs(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from raytune_ft.train.checkpoint import CheckpointError, weights_only_loads

    honest = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "w": torch.ones(2)}, honest)
    marker = tmp_path / "pwned"
    planted = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": Planted(str(marker))}, planted)

    original = torch.load
    with weights_only_loads():
        # DeepSpeed asks for weights_only=False; its own state classes still load, as tensors and plain data do
        state = torch.load(honest, map_location="cpu", weights_only=False)
        assert state["zero_stage"] == ZeroStageEnum.gradients and torch.equal(state["w"], torch.ones(2))
        with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: refused to unpickle posix.system"):
            torch.load(planted, map_location="cpu", weights_only=False)
    assert not marker.exists()
    assert torch.load is original  # restored on the way out


def test_a_restarted_trial_finds_the_newest_whole_checkpoint_of_its_earlier_runs(tmp_path):
    from raytune_ft.tune.trial import _earlier_checkpoint

    (tmp_path / "run-0").mkdir()
    (tmp_path / "run-1").mkdir()
    make_checkpoint(tmp_path / "run-0" / "step_000004", 4)
    newest = make_checkpoint(tmp_path / "run-0" / "step_000008", 8)
    (newest / "manifest.rank1.json").unlink()  # killed mid-write: never whole
    # run-1 (the attempt before this one) died before its first checkpoint: look further back
    assert _earlier_checkpoint(tmp_path, attempt=2, logged_step=12) == (str(tmp_path / "run-0" / "step_000004"), 4)
    assert _earlier_checkpoint(tmp_path, attempt=0, logged_step=12) is None
    make_checkpoint(tmp_path / "run-1" / "step_000012", 12)
    assert _earlier_checkpoint(tmp_path, attempt=2, logged_step=12) == (str(tmp_path / "run-1" / "step_000012"), 12)


def test_the_recipe_reads_its_config_and_joins_hooks_it_does_not_know(tmp_path):
    """Ray Train hands every restart of a worker group the same config dict: the recipe cannot write into it.
    Code outside the recipe (the benchmark, tests' faults) joins through StepHooks, which do nothing by default."""
    from types import SimpleNamespace

    from raytune_ft.bench.train import BenchFigures
    from raytune_ft.train.hooks import StepHooks
    from raytune_ft.train.loop import Recipe

    config = {"experiment": cfg_with(tmp_path).model_dump(mode="json", by_alias=True), "classes": None}
    recipe = Recipe({**config, "pad_token_id": 0}, hooks=[StepHooks()])
    with pytest.raises(TypeError):
        recipe.config["total_steps"] = 24  # type: ignore[index]
    assert StepHooks().on_step_end(recipe, 1) is False
    assert BenchFigures().on_step_end(SimpleNamespace(total=4), 3) is False  # figures at the last step only
