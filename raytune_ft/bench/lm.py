"""`raytune-ft bench lm`: GPU-scale fine-tuning throughput. A Llama-style causal LM built from a config (random
weights: throughput does not depend on what they are) trains on packed blocks of random tokens, for each ZeRO
stage and fine-tuning method, twice: through the Ray Train + DeepSpeed loop users run, and through a bare
DeepSpeed loop in one process without Ray, which starts its engine with the same code (train/engine.py)."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raytune_ft.bench.flops import mfu
from raytune_ft.bench.train import bench_loop, run_in_fresh_process, run_on_ray
from raytune_ft.config import ExperimentConfig

# Llama shapes. 1b is TinyLlama-1.1B's (grouped-query attention, 4 KV heads); the others are for CPU checks.
LM_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
    "130m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 2048},
    "350m": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 2816},
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "intermediate_size": 5632,
    },
}
VOCAB = 32000
PAD_ID = 0


def build_lm(size: str, seq_len: int, out_dir: Path, seed: int = 0, vocab: int = VOCAB) -> int:
    """Save a random-init Llama of SIZE (bf16 on disk: half the bytes; training loads it in fp32); its parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"num_key_value_heads": LM_SIZES[size]["num_attention_heads"], **LM_SIZES[size]}
    config = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(out_dir)
    return n_params


def random_blocks(n: int, seq_len: int, seed: int, vocab: int = VOCAB) -> list[list[int]]:
    """Full blocks, as packing leaves them (tokenize_causal_blocks): no padding, every position a token."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seq_len), generator=generator).tolist()


def lm_config(
    model_dir: Path,
    out_dir: Path,
    *,
    stage: int,
    method: str,
    steps: int,
    micro_batch: int,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    precision: str = "auto",
    attn: str = "auto",
    activation_checkpointing: bool = False,
    compile_model: bool = False,
    fused_adamw: bool | None = None,
    address: str | None = None,
) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": f"bench-lm-zero{stage}-{method}",
            "seed": 0,
            "output_dir": str(out_dir),
            "model": {"name_or_path": str(model_dir), "task": "causal-lm", "attn_implementation": attn},
            "data": {"path": "random-tokens", "columns": {"label": None}},
            "finetune": {"method": method, "lora": {"r": 16, "alpha": 32}},
            "deepspeed": {"zero_stage": stage, "precision": precision},
            "train": {
                "lr": 1e-5,
                "batch_size": micro_batch,
                "epochs": 1,
                "max_steps": steps,
                "eval_every_steps": steps,
                "checkpoint_every_steps": steps,
                "lr_schedule": "constant",
                "activation_checkpointing": activation_checkpointing,
                "compile": compile_model,
                "fused_adamw": fused_adamw,
            },
            "scaling": {
                "num_workers": workers,
                "use_gpu": use_gpu,
                "cpus_per_worker": cpus_per_worker,
                "gpus_per_worker": 1 if use_gpu else 0,
            },
            "cluster": {"address": address},
        }
    )


def bare_deepspeed_loop(payload: dict[str, Any], queue: Any) -> None:
    """One process, world size 1, no Ray: the model, engine settings and batches of the Ray run."""
    import resource

    import torch

    from raytune_ft.modeling import build_model, param_groups
    from raytune_ft.train.batches import collate
    from raytune_ft.train.ds_config import deepspeed_config, resolved_precision
    from raytune_ft.train.engine import enable_activation_checkpointing, make_optimizer, start_engine
    from raytune_ft.train.evaluate import task_loss
    from raytune_ft.train.measure import SteadyClock, model_sizes, peak_device_mb

    cfg = ExperimentConfig.model_validate(payload["experiment"])
    torch.set_num_threads(payload["threads"])
    use_cuda = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(payload["port"]), RANK="0", LOCAL_RANK="0")
    os.environ["WORLD_SIZE"] = "1"
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo", rank=0, world_size=1)
    precision = resolved_precision(cfg, use_cuda)
    ds_config = deepspeed_config(cfg, precision, payload["hidden_size"])
    if cfg.deepspeed.zero_stage == 3:
        from raytune_ft.train.ds_config import import_deepspeed

        import_deepspeed()  # before transformers' DeepSpeed integration imports it
        from transformers.integrations import HfDeepSpeedConfig

        _zero3_init = HfDeepSpeedConfig(ds_config)  # held: transformers keeps only a weak reference
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.finetune)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    groups = param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.finetune.layerwise_lr_decay)
    optimizer = make_optimizer(cfg, groups, use_cuda)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    sizes = model_sizes(model)
    engine = start_engine(cfg, model, optimizer, scheduler, ds_config)
    engine.train()
    train = payload["data"]["train"]
    clock = SteadyClock()
    running = 0.0
    micro = cfg.train.batch_size
    for step in range(cfg.train.max_steps or 1):
        began = time.perf_counter()
        rows = list(range(step * micro, (step + 1) * micro))
        batch = collate(train, rows, PAD_ID, device)
        loss = task_loss(engine, batch, False, None)
        engine.backward(loss)
        engine.step()
        running += loss.detach()
        if use_cuda:
            torch.cuda.synchronize()
        clock.step_done(began, len(rows), int(batch["attention_mask"].sum()))
    queue.put(
        {
            "samples_per_s": clock.samples / clock.seconds if clock.seconds else None,
            "tokens_per_s": clock.tokens / clock.seconds if clock.seconds else None,
            "first_step_at": clock.first_step_at,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_device_mb": peak_device_mb(device),
            "final_loss": float(running) / max(1, cfg.train.max_steps or 1),
            "precision": precision,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if use_cuda else "cpu",
            **sizes,
        }
    )
    torch.distributed.destroy_process_group()


def bench_lm(
    *,
    size: str,
    seq_len: int,
    micro_batch: int,
    steps: int,
    stages: list[int],
    methods: list[str],
    workers: int = 1,
    use_gpu: bool | None = None,
    bare: bool = True,
    peak_tflops: float | None = None,
    address: str | None = None,
    log: Callable[[str], None] = print,
    **engine: Any,
) -> dict[str, Any]:
    """ENGINE: precision, attn, activation_checkpointing, compile_model, fused_adamw (see lm_config). ADDRESS: a
    running Ray cluster on this machine to run on instead of an embedded one (the model is built in a local
    temporary directory, which only this machine's workers can read)."""
    import ray
    import torch

    from raytune_ft.train.ray_cluster import ensure_ray

    if steps < 2:
        raise ValueError("--steps must be at least 2: the first step is start-up, the rest are timed")
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    elif use_gpu and not torch.cuda.is_available():
        # the embedded Ray would wait for a GPU that never comes
        raise ValueError("--device gpu: this machine has no CUDA GPU that PyTorch can see")
    cpus = os.cpu_count() or 1
    cpus_per_worker = max(1, cpus // workers)
    blocks = random_blocks(steps * micro_batch * workers, seq_len, seed=0)
    data = {"train": {"input_ids": blocks}, "validation": {"input_ids": blocks[:1]}}
    data_ref = None
    out: dict[str, Any] = {"size": size, "seq_len": seq_len, "micro_batch": micro_batch, "steps": steps}
    out.update(workers=workers, engine=dict(engine), runs=[])
    with tempfile.TemporaryDirectory(prefix="raytune-ft-bench-lm-") as tmp:
        model_dir = Path(tmp) / "model"
        out["params"] = build_lm(size, seq_len, model_dir)
        log(f"Llama {size}: {out['params'] / 1e6:.1f}M parameters built from a config, sequence length {seq_len}")
        hidden = LM_SIZES[size]["hidden_size"]
        for stage in stages:
            for method in methods:
                cfg = lm_config(
                    model_dir,
                    Path(tmp) / "runs",
                    stage=stage,
                    method=method,
                    steps=steps,
                    micro_batch=micro_batch,
                    workers=workers,
                    use_gpu=use_gpu,
                    cpus_per_worker=cpus_per_worker,
                    address=address,
                    **engine,
                )
                experiment = cfg.model_dump(mode="json", by_alias=True)
                if data_ref is None:
                    ensure_ray(cfg)  # an embedded local Ray unless ADDRESS, as `raytune-ft train` starts it
                    data_ref = ray.put(data)
                log(f"ZeRO-{stage} {method}: Ray Train + DeepSpeed, {workers} worker(s), {steps} steps")
                loop_config = {
                    "experiment": experiment,
                    "data": data_ref,
                    "classes": None,
                    "class_weights": None,
                    "pad_token_id": PAD_ID,
                }
                metrics, started = run_on_ray(cfg, bench_loop(), loop_config, str(Path(tmp) / "runs"), cfg.name)
                ray_side = _figures(metrics, workers, peak_tflops)
                ray_side["time_to_first_step_s"] = metrics["first_step_at"] - started
                run: dict[str, Any] = {"zero_stage": stage, "method": method, "ray": ray_side}
                if bare and workers == 1:
                    log(f"ZeRO-{stage} {method}: bare DeepSpeed loop, one process")
                    payload = {"experiment": experiment, "data": data, "threads": cpus_per_worker}
                    payload.update(hidden_size=hidden, port=free_port())
                    found = run_in_fresh_process(bare_deepspeed_loop, payload, "bare DeepSpeed loop")
                    run["bare"] = {
                        **_figures(found, 1, peak_tflops),
                        "time_to_first_step_s": found["time_to_first_step_s"],
                    }
                    if run["bare"]["tokens_per_s"] and ray_side["tokens_per_s"]:
                        run["ray_vs_bare"] = ray_side["tokens_per_s"] / run["bare"]["tokens_per_s"]
                out["runs"].append(run)
    return out


def free_port() -> int:
    """For the bare loop's one-process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _figures(metrics: dict[str, Any], devices: int, peak_tflops: float | None) -> dict[str, Any]:
    keys = ("tokens_per_s", "samples_per_s", "peak_device_mb", "peak_rss_mb", "n_params", "n_trainable")
    found = {k: metrics.get(k) for k in (*keys, "device", "device_name", "precision")}
    found["mfu"] = mfu(metrics, devices, peak_tflops)
    found["mfu_6n"] = mfu(metrics, devices, peak_tflops, attention=False)
    return found
