"""`raytune-ft bench train --zero-stages`: per-worker memory of each ZeRO stage on a causal LM large enough for
parameters, gradients and Adam states to dominate, beside what DeepSpeed's own estimator predicts."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raytune_ft.bench.lm import LM_SIZES
from raytune_ft.bench.train import bench_config, bench_loop, run_on_ray
from raytune_ft.config import ExperimentConfig

# Llama shapes built from a config with random weights (memory does not depend on what the weights are).
MEMORY_MODELS = LM_SIZES
BLOCK_SIZE = 128
STEPS = 3
TEXTS = 2000


def build_memory_model(size: str, tokenizer: Any, out_dir: Path, seed: int) -> tuple[int, int]:
    """Save a random-init Llama of the given shape with the experiment's tokenizer; (params, largest layer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"num_key_value_heads": MEMORY_MODELS[size]["num_attention_heads"], **MEMORY_MODELS[size]}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=BLOCK_SIZE,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id,
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return params, largest


def estimator_mb(stage: int, params: int, largest_layer: int, workers: int) -> float:
    """DeepSpeed's per-device estimate of model states (mixed precision, no offload). Stage 0 is the stage-1/2
    formula on one device, where nothing is partitioned."""
    from raytune_ft.train.ds_config import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 3:
        _, device_bytes, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer, num_gpus_per_node=workers, cpu_offload=False, cpu_offload_params=False
        )
    else:
        _, device_bytes = estimate_zero2_model_states_mem_needs(
            params, num_gpus_per_node=1 if stage == 0 else workers, cpu_offload=False
        )
    return device_bytes / 2**20


def memory_config(cfg: ExperimentConfig, model_dir: Path, stage: int) -> ExperimentConfig:
    return bench_config(
        cfg,
        STEPS,
        model={"name_or_path": str(model_dir), "task": "causal-lm"},
        finetune={"method": "full", "lora": {}, "freeze": {}, "gradual_unfreeze": None, "ewc": None, "l1": 0.0},
        deepspeed={"zero_stage": stage, "offload_optimizer": False, "offload_params": False},
        train={"batch_size": 2, "grad_accum": 1, "epochs": 1},
        data={"columns": {"text": cfg.data.columns.text, "label": None}, "labels": None, "label_names": None},
    )


def bench_memory(
    cfg: ExperimentConfig, stages: list[int], size: str = "130m", log: Callable[[str], None] = print
) -> dict[str, Any]:
    import ray

    from raytune_ft.data import load_split, prepare_data
    from raytune_ft.data.tokenize import tokenize_causal_blocks
    from raytune_ft.model_source import load_tokenizer
    from raytune_ft.train.ray_cluster import ensure_ray

    workers = cfg.scaling.num_workers
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    texts = load_split(prepare_data(cfg, with_tokens=False).data_dir, "train").column("text").to_pylist()[:TEXTS]
    blocks = tokenize_causal_blocks(texts, tokenizer, BLOCK_SIZE)["input_ids"]
    need = STEPS * 2 * workers
    if len(blocks) < need + 1:
        raise ValueError(f"the training split gives {len(blocks)} blocks of {BLOCK_SIZE} tokens; need {need + 1}")
    data = {"train": {"input_ids": blocks[:need]}, "validation": {"input_ids": blocks[need : need + 1]}}
    ensure_ray(cfg)
    out: dict[str, Any] = {"model": f"llama-{size}", "block_size": BLOCK_SIZE, "workers": workers, "stages": {}}
    with tempfile.TemporaryDirectory(prefix="raytune-ft-memory-") as tmp:
        model_dir = Path(tmp) / "model"
        params, largest = build_memory_model(size, tokenizer, model_dir, cfg.seed)
        out.update(params=params, largest_layer_params=largest)
        log(f"memory model: Llama {params / 1e6:.1f}M parameters built from a config, {workers} worker(s)")
        data_ref = ray.put(data)
        for stage in stages:
            log(f"ZeRO-{stage}: {STEPS} steps")
            mcfg = memory_config(cfg, model_dir, stage)
            loop_config = {
                "experiment": mcfg.model_dump(mode="json", by_alias=True),
                "data": data_ref,
                "classes": None,
                "class_weights": None,
                "pad_token_id": tokenizer.pad_token_id,
            }
            loop = bench_loop(measure_model_state=True)
            metrics, _ = run_on_ray(mcfg, loop, loop_config, str(Path(tmp) / "runs"), f"zero{stage}")
            out["stages"][str(stage)] = {
                "peak_rss_mb": metrics["peak_rss_mb"],
                "rss_growth_mb": metrics["rss_growth_mb"],
                "model_state_mb": metrics["model_state_mb"],
                "peak_device_mb": metrics.get("peak_device_mb"),
                "estimator_mb": estimator_mb(stage, params, largest, workers),
            }
    found = out["stages"]
    if "0" in found and "3" in found:
        out["zero3_vs_zero0"] = found["3"]["model_state_mb"] / found["0"]["model_state_mb"]
        out["zero3_vs_zero0_peak_rss"] = found["3"]["peak_rss_mb"] / found["0"]["peak_rss_mb"]
        out["estimator_zero3_vs_zero0"] = found["3"]["estimator_mb"] / found["0"]["estimator_mb"]
    return out
