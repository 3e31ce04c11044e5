"""Benchmark parts that need no Ray: FLOPs and MFU, the benchmarked config and rows, DeepSpeed's estimator,
model-state counting, the Muon stand-in, and the `bench train` argument checks."""

from __future__ import annotations

import sys

import pytest
import torch
from test_cli import balanced_rows, experiment, runner
from test_train_parts import cfg_with
from transformers import AutoModelForCausalLM

from raytune_ft.bench.flops import flops_per_token, mfu, peak_tflops_of, train_flops_per_token
from raytune_ft.bench.memory import estimator_mb
from raytune_ft.bench.train import bench_config, bench_data, global_batch
from raytune_ft.cli import app
from raytune_ft.train.ds_config import deepspeed_config, stand_in_for_deepspeed_muon
from raytune_ft.train.measure import model_state_mb


def test_flops_per_token_counts_backward_weight_gradients_only_for_trainable_weights():
    assert train_flops_per_token(1000, 1000) == 6000  # full fine-tuning: 6N
    assert train_flops_per_token(1000, 10) == 4020  # LoRA: forward 2N + activation gradients 2N + 2 per adapter


def test_attention_flops_follow_layers_hidden_and_sequence_length():
    # 12 x layers x hidden x seq_len per token on top of the weights' 6N, for LoRA as for full fine-tuning
    assert train_flops_per_token(1000, 1000, layers=2, hidden=64, seq_len=128) == 6000 + 12 * 2 * 64 * 128
    assert train_flops_per_token(1000, 10, layers=2, hidden=64, seq_len=128) == 4020 + 12 * 2 * 64 * 128
    # a run's figures: matmul weights (embedding tables left out), mean tokens per sample as the sequence length
    run = {"n_params": 5000, "n_trainable": 5000, "n_matmul_params": 1000, "n_matmul_trainable": 1000}
    run.update(n_layers=2, hidden_size=64, tokens_per_s=2560.0, samples_per_s=10.0)
    assert flops_per_token(run) == 6000 + 12 * 2 * 64 * 256
    assert flops_per_token(run, attention=False) == 6000
    assert flops_per_token({"tokens_per_s": 1.0}) is None


def test_mfu_counts_attention_unless_asked_for_the_weights_alone():
    run = {"device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "tokens_per_s": 1e4, "samples_per_s": 5.0}
    run.update(n_matmul_params=10**9, n_matmul_trainable=10**9, n_layers=22, hidden_size=2048)
    weights = 6e9 * 1e4 / 989e12
    assert mfu(run, devices=1, attention=False) == pytest.approx(weights)
    assert mfu(run, devices=1) == pytest.approx(weights + 12 * 22 * 2048 * 2000 * 1e4 / 989e12)


def test_mfu_uses_the_device_peak_and_is_none_on_cpu():
    assert peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_of("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_of("Some New Accelerator") is None
    gpu = {"device": "cuda:0", "device_name": "NVIDIA A100-SXM4-80GB", "tokens_per_s": 1000.0}
    gpu.update(n_params=10**9, n_trainable=10**9)
    assert mfu(gpu, devices=1) == pytest.approx(6e12 / 312e12)
    assert mfu(gpu, devices=2) == pytest.approx(6e12 / 624e12)
    assert mfu({**gpu, "device_name": "Unknown"}, devices=1) is None
    assert mfu({**gpu, "device_name": "Unknown"}, devices=1, peak_tflops=100.0) == pytest.approx(0.06)
    assert mfu({**gpu, "device": "cpu"}, devices=1) is None


def test_bench_config_runs_exactly_the_steps_and_nothing_between(tmp_path):
    cfg = cfg_with(tmp_path, train={"eval_every_steps": 5, "early_stopping": {"metric": "eval_loss"}})
    bench = bench_config(cfg, 7, deepspeed={"zero_stage": 3}, train={"epochs": 4})
    assert (bench.train.max_steps, bench.train.eval_every_steps, bench.train.checkpoint_every_steps) == (7, 7, 7)
    assert bench.train.early_stopping is None and bench.train.epochs == 4
    assert bench.deepspeed.zero_stage == 3 and cfg.deepspeed.zero_stage == 2  # the original is untouched


def test_bench_data_takes_the_rows_the_steps_read(tmp_path):
    cfg = cfg_with(tmp_path, train={"batch_size": 2, "grad_accum": 3}, scaling={"num_workers": 2})
    assert global_batch(cfg) == 12
    rows = {"input_ids": [[i] for i in range(100)], "labels": list(range(100))}
    data, epochs = bench_data({"train": rows, "validation": rows}, cfg, steps=5)
    assert data["train"]["labels"] == list(range(60)) and epochs == 1
    assert len(data["validation"]["input_ids"]) == 8
    data, epochs = bench_data({"train": rows, "validation": rows}, cfg, steps=20)
    assert len(data["train"]["labels"]) == 100 and epochs == 3  # 8 steps per epoch cover 20 steps in 3 epochs


def test_deepspeed_estimator_partitions_states_over_workers():
    params, largest = 100 * 2**20, 10 * 2**20
    assert estimator_mb(0, params, largest, workers=2) == pytest.approx(20 * 100)  # 2 + 18 bytes a parameter
    assert estimator_mb(2, params, largest, workers=2) == pytest.approx(2 * 100 + 9 * 100)
    assert estimator_mb(3, params, largest, workers=2) == pytest.approx(4 * 10 + 9 * 100)


def test_buckets_are_sized_to_the_model_and_overrides_still_win(tmp_path):
    zero3 = deepspeed_config(cfg_with(tmp_path, deepspeed={"zero_stage": 3}), "fp32", hidden_size=64)
    assert zero3["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert zero3["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero3["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    zero2 = deepspeed_config(cfg_with(tmp_path, deepspeed={"zero_stage": 2}), "fp32", hidden_size=64)
    assert zero2["zero_optimization"]["allgather_bucket_size"] == 4096
    assert "stage3_prefetch_bucket_size" not in zero2["zero_optimization"]
    assert "reduce_bucket_size" not in deepspeed_config(cfg_with(tmp_path), "fp32")["zero_optimization"]
    overridden = cfg_with(
        tmp_path, deepspeed={"zero_stage": 2, "overrides": {"zero_optimization": {"reduce_bucket_size": 5}}}
    )
    assert deepspeed_config(overridden, "fp32", hidden_size=64)["zero_optimization"]["reduce_bucket_size"] == 5


class _Engine:
    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module


def test_model_state_counts_parameters_gradients_and_adam_states():
    model = torch.nn.Linear(256, 256)
    param_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    before = model_state_mb(_Engine(model))
    model(torch.randn(2, 256)).sum().backward()
    with_grads = model_state_mb(_Engine(model))
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    with_states = model_state_mb(_Engine(model))
    assert with_grads - before == pytest.approx(param_mb, rel=0.05)
    assert with_states - with_grads == pytest.approx(2 * param_mb, rel=0.05)  # exp_avg and exp_avg_sq


def test_muon_stand_in_answers_isinstance_and_refuses_to_run():
    names = ["deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon"]
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    try:
        stand_in_for_deepspeed_muon()
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
        from deepspeed.runtime.zero.muon.original_muon import muon_update

        assert not isinstance(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), MuonWithAuxAdam)
        with pytest.raises(RuntimeError, match="never uses DeepSpeed's Muon"):
            muon_update(torch.zeros(1))
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--zero-stages", "0,x"], "expected numbers such as 0,2,3"),
        (["--zero-stages", "0,4"], "ZeRO stages are 0, 1, 2 and 3"),
        (["--memory-model", "huge", "--zero-stages", "3"], "expected one of tiny, 130m, 350m, 1b"),
        (["--memory-only"], "--memory-only needs --zero-stages"),
        (["--steps", "1"], "greater than or equal to 2"),
    ],
)
def test_bench_train_refuses_bad_arguments(tmp_path, args, message):
    result = runner.invoke(app, ["bench", "train", str(experiment(tmp_path, balanced_rows(4))), *args])
    assert result.exit_code == 2
    assert message in result.stderr.replace("\n", " ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "7b"], "--size: expected values from tiny, 130m, 350m, 1b"),
        (["--zero-stages", "2,x"], "--zero-stages: expected a comma-separated list of 0, 1, 2, 3"),
        (["--zero-stages", "5"], "--zero-stages: expected values from 0, 1, 2, 3"),
        (["--methods", "full,qlora"], "--methods: expected values from full, lora, got 'full,qlora'"),
        (["--attn", "flash"], "--attn: expected values from auto, sdpa, eager, flash_attention_2"),
        (["--device", "tpu"], "--device: expected values from auto, gpu, cpu"),
        (["--steps", "1"], "greater than or equal to 2"),
        *(
            [(["--device", "gpu"], "--device gpu: this machine has no CUDA GPU")]
            if not torch.cuda.is_available()
            else []
        ),
    ],
)
def test_bench_lm_refuses_bad_arguments(args, message):
    result = runner.invoke(app, ["bench", "lm", *args])
    assert result.exit_code == 2
    assert message in result.stderr.replace("\n", " ")


def test_bench_lm_builds_the_llama_shapes_it_names(tmp_path):
    from raytune_ft.bench.lm import build_lm, lm_config, random_blocks

    params = build_lm("tiny", 32, tmp_path / "m")
    assert params == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path / "m").parameters())
    blocks = random_blocks(3, 32, seed=0)
    assert len(blocks) == 3 and all(len(b) == 32 and min(b) >= 3 for b in blocks)  # packed: no padding, no specials
    cfg = lm_config(
        tmp_path / "m",
        tmp_path,
        stage=3,
        method="lora",
        steps=4,
        micro_batch=2,
        workers=1,
        use_gpu=False,
        cpus_per_worker=2,
        activation_checkpointing=True,
        compile_model=True,
    )
    assert (cfg.deepspeed.zero_stage, cfg.finetune.method, cfg.train.max_steps) == (3, "lora", 4)
    assert cfg.train.activation_checkpointing and cfg.train.compile and cfg.model.task == "causal-lm"
    # 1b is TinyLlama-1.1B's shape: built on the meta device here, its parameters counted, none allocated
    from transformers import LlamaConfig

    from raytune_ft.bench.lm import LM_SIZES, VOCAB

    with torch.device("meta"):
        big = AutoModelForCausalLM.from_config(
            LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, **LM_SIZES["1b"])
        )
    assert 1.09e9 < sum(p.numel() for p in big.parameters()) < 1.11e9


def test_steps_trained_counts_what_each_trial_ran_not_where_it_ended(tmp_path):
    import json

    from raytune_ft.bench.tune import steps_trained

    def trial(name, reports):
        folder = tmp_path / "trials" / name
        folder.mkdir(parents=True)
        (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in reports))

    trial("run_trial_a", [{"step": 40}, {"step": 80}, {"step": 120}])
    # exploited the donor's step-80 checkpoint after its own step 40: trained 40 + 40, not 120
    trial("run_trial_b", [{"step": 40}, {"step": 120, "resumed_step": 80}])
    trial("run_trial_c", [])  # never reported
    (tmp_path / "trials" / "searcher-state.pkl").write_bytes(b"")
    assert steps_trained(str(tmp_path)) == 120 + 80


def test_memory_after_the_last_trial_is_sampled_even_when_the_search_ends_at_once():
    """`bench tune` reads each trial's memory 2 s after its last report; a search that ends sooner has no periodic
    sample then, and the sample taken as the sampler stops (every trial's workers gone) stands in."""
    import time

    from raytune_ft.bench.tune import MemorySampler

    with MemorySampler() as memory:
        last_report = time.time()
    assert memory.samples  # the one taken as it stopped, at least
    after = memory.at(last_report + 2.0)
    assert after is not None and after[0] > 0 and after[1] > 0
    assert after == memory.samples[-1][1:]
    assert memory.at(0.0) == memory.samples[0][1:]  # a time it sampled past: the first sample at or after it


def test_bench_data_spreads_packed_rows_over_the_split(tmp_path):
    """pack() opens rows longest example first: the first packed rows are the fullest, so a packed split's rows
    are taken evenly spaced; a plain split keeps its first rows unless asked to spread them."""
    from raytune_ft.bench.train import bench_rows

    assert bench_rows(10, 4, spread=True) == [0, 2, 5, 7]
    assert bench_rows(10, 4, spread=False) == [0, 1, 2, 3]
    assert bench_rows(3, 4, spread=True) == [0, 1, 2]  # fewer rows than the steps read: all of them
    cfg = cfg_with(tmp_path, train={"batch_size": 2, "grad_accum": 1}, scaling={"num_workers": 1})
    packed = {"input_ids": [[i] for i in range(10)], "labels": [[i] for i in range(10)], "seq_lens": [[1]] * 10}
    data, _ = bench_data({"train": packed, "validation": packed}, cfg, steps=2)
    assert data["train"]["input_ids"] == [[0], [2], [5], [7]]
    plain = {k: v for k, v in packed.items() if k != "seq_lens"}
    data, _ = bench_data({"train": plain, "validation": plain}, cfg, steps=2)
    assert data["train"]["input_ids"] == [[0], [1], [2], [3]]
    data, _ = bench_data({"train": plain, "validation": plain}, cfg, steps=2, spread=True)
    assert data["train"]["input_ids"] == [[0], [2], [5], [7]]


def test_step_counts_count_conversations_real_tokens_and_padded_positions():
    from raytune_ft.bench.train import step_counts

    packed = {"input_ids": [[1] * 6, [1] * 4, [1] * 8], "seq_lens": [[2, 4], [4], [3, 3, 2]]}
    # micro-batches [0, 1] (padded to 6) and [2]: 2 + 1 + 3 conversations, 18 tokens, 2 x 6 + 8 positions
    assert step_counts(packed, [[0, 1], [2]]) == {"examples": 6, "tokens": 18, "slots": 20}
    assert step_counts(packed, [[0, 1], [2]], varlen=True) == {"examples": 6, "tokens": 18, "slots": 18}
    plain = {"input_ids": [[1] * 3, [1] * 5], "labels": [[-100, 1, 1], [-100] * 5]}
    # a plain row is one conversation; varlen only changes packed rows (plain ones are padded anyway)
    assert step_counts(plain, [[0, 1]], varlen=True) == {"examples": 2, "tokens": 8, "slots": 10}


def test_speedups_are_packed_over_padded_per_rate():
    from raytune_ft.bench.train import PACKING_KEYS, speedups

    packed = {"tokens_per_s": 300.0, "conversations_per_s": 6.0, "samples_per_s": 1.0}
    padded = {"tokens_per_s": 100.0, "conversations_per_s": 2.0, "samples_per_s": 2.0}
    assert speedups(packed, padded) == {"tokens_per_s": 3.0, "conversations_per_s": 3.0, "samples_per_s": 0.5}
    assert set(speedups({}, padded)) == set(PACKING_KEYS)
    assert speedups({"tokens_per_s": 1.0}, {"tokens_per_s": 0.0})["tokens_per_s"] is None


def test_with_packing_sets_only_the_packing_flag(tmp_path):
    from raytune_ft.bench.train import with_packing

    chat = {"template": "tokenizer", "train_on": "all", "packing": True}
    cfg = cfg_with(
        tmp_path, model={"name_or_path": str(tmp_path / "m"), "task": "chat"}, data={"path": "d.jsonl", "chat": chat}
    )
    off = with_packing(cfg, False)
    assert off.data.chat.packing is False and cfg.data.chat.packing is True  # the original is untouched
    assert (off.data.chat.template, off.data.chat.train_on) == ("tokenizer", "all")
    assert with_packing(off, True).data.chat == cfg.data.chat


def test_bench_train_packing_needs_a_chat_experiment(tmp_path):
    result = runner.invoke(app, ["bench", "train", str(experiment(tmp_path, balanced_rows(4))), "--packing"])
    assert result.exit_code == 2
    message = result.stderr.replace("\n", " ")
    assert "--packing" in message and "model.task: chat" in message and "'sequence-classification'" in message
