"""Losses and evaluation on the validation split, summed exactly across workers."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from raytune_ft.config.schema import ExperimentConfig
from raytune_ft.metrics import (
    classification_metrics,
    confusion_matrix,
    pack_counts,
    perplexity,
    slice_metrics,
    unpack_counts,
    whole_metrics,
)
from raytune_ft.train.batches import collate, model_inputs

PROBE_ROWS = 4
# a causal LM's probe keeps the logits of its first positions: all of them were 60 MB per checkpoint for a
# 49k-token vocabulary (4 rows x 256 positions), and a few positions check the export as well
PROBE_POSITIONS = 8


def task_loss(
    module: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    classification: bool,
    class_weights: torch.Tensor | None,
    task: str | None = None,
) -> torch.Tensor:
    """TASK names an extra task of a multi-task model (its head); None is the model's own task."""
    extra = {"task": task} if task is not None else {}
    out = module(**model_inputs(batch), **extra)
    if classification:
        return F.cross_entropy(out.logits.float(), batch["labels"], weight=class_weights)
    if "labels" in batch:  # chat: the answers' tokens only
        return label_loss(out.logits, batch["labels"], "mean")[0]
    return next_token_loss(out.logits, batch["input_ids"], batch["attention_mask"], "mean")[0]


def label_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> tuple[torch.Tensor, int]:
    """Next-token loss on the tokens whose label is not -100: the logits at t predict the label at t+1."""
    targets = labels[:, 1:].reshape(-1)
    n_tokens = int((targets != -100).sum())
    shift = logits[:, :-1].float().reshape(-1, logits.size(-1))
    return F.cross_entropy(shift, targets, ignore_index=-100, reduction=reduction), n_tokens


def next_token_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, reduction: str
) -> tuple[torch.Tensor, int]:
    shift_logits = logits[:, :-1].float().reshape(-1, logits.size(-1))
    targets = input_ids[:, 1:].reshape(-1).masked_fill(mask[:, 1:].reshape(-1) == 0, -100)
    n_tokens = int((targets != -100).sum())
    return F.cross_entropy(shift_logits, targets, ignore_index=-100, reduction=reduction), n_tokens


def over_ranks(value: float, world: int, device: torch.device, op: str = "mean") -> float:
    """Mean or max of one number across workers."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(
        t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
    )
    return float(t.item()) if op == "max" else float(t.item() / world)


@torch.no_grad()
def evaluate(
    engine: Any,
    val: dict[str, list],
    rank: int,
    world: int,
    cfg: ExperimentConfig,
    classes: list[str],
    pad_id: int,
    device: torch.device,
    task: str | None = None,
    names: list[str] | None = None,
) -> dict[str, Any]:
    """Each rank scores its slice; one all-reduce of summed counts gives exact global metrics. Every rank runs
    the same number of forward passes (ZeRO-3 gathers weights collectively), padding its slice if shorter."""
    engine.eval()
    extra = {"task": task} if task is not None else {}  # an extra task's head (multi-task models)
    label_names = list(names) if names else _names(cfg, classes)
    n = len(val["input_ids"])
    # by length, so that each batch pads little; the metrics are sums over rows and do not depend on the order
    rows = sorted(range(n), key=lambda i: len(val["input_ids"][i]))[rank::world]
    per_rank = math.ceil(n / world)
    batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
    loss_sum, count = 0.0, 0
    confusion = torch.zeros((len(classes), len(classes)), dtype=torch.long) if classes else None
    sliced = bool(classes) and ("slices" in val or "whole" in val)
    # predictions by row (+1, so 0 means "another rank's row"); summed over ranks for per-slice metrics
    preds_by_row = torch.zeros(n, dtype=torch.long) if sliced else None
    for start in range(0, per_rank, batch_size):
        chunk = rows[start : start + batch_size]
        real = len(chunk)
        chunk = chunk + [0] * (min(batch_size, per_rank - start) - real)  # dummies keep ranks in lockstep
        batch = collate(val, chunk, pad_id, device)
        out = engine(**model_inputs(batch), **extra)
        if real == 0:
            continue
        if classes:
            logits, labels = out.logits[:real].float(), batch["labels"][:real]
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            count += real
            preds = logits.argmax(-1).cpu()
            confusion += confusion_matrix(preds, labels.cpu(), len(classes))
            if preds_by_row is not None:
                preds_by_row[torch.tensor(chunk[:real])] = preds + 1
        elif "labels" in batch:
            loss, tokens = label_loss(out.logits[:real], batch["labels"][:real], "sum")
            loss_sum += float(loss)
            count += tokens
        else:
            loss, tokens = next_token_loss(
                out.logits[:real], batch["input_ids"][:real], batch["attention_mask"][:real], "sum"
            )
            loss_sum += float(loss)
            count += tokens
    packed = pack_counts(loss_sum, count, confusion).to(device)
    if world > 1:
        torch.distributed.all_reduce(packed)
    loss_sum, count, confusion = unpack_counts(packed.cpu(), len(classes) if classes else None)
    if preds_by_row is not None and world > 1:
        on_device = preds_by_row.to(device)
        torch.distributed.all_reduce(on_device)
        preds_by_row = on_device.cpu()
    engine.train()
    mean_loss = loss_sum / max(1, count)
    metrics: dict[str, Any] = {"eval_loss": mean_loss}
    if confusion is not None:
        metrics.update({f"eval_{k}": v for k, v in classification_metrics(confusion, label_names).items()})
        preds = (preds_by_row - 1).tolist() if preds_by_row is not None else []
        if "slices" in val and preds:
            found = slice_metrics(preds, val["labels"], val["slices"], label_names)
            for value, m in found["slices"].items():
                metrics[f"eval_slice/{value}/accuracy"] = m["accuracy"]
                metrics[f"eval_slice/{value}/f1_macro"] = m["f1_macro"]
            metrics["eval_slice_f1_gap"] = found["f1_macro_gap"]
            metrics["eval_worst_slice_f1"] = found["slices"][found["worst_slice"]]["f1_macro"]
        if "whole" in val and preds:
            found = whole_metrics(preds, val["labels"], val["whole"], label_names)
            metrics.update({f"eval_{k}": v for k, v in found.items()})
    else:
        metrics["eval_perplexity"] = perplexity(mean_loss)
    return metrics


@torch.no_grad()
def generation_metrics(
    engine: Any, val: dict[str, list], rank: int, world: int, cfg: ExperimentConfig, pad_id: int, tokenizer: Any
) -> dict[str, Any]:
    """eval_gen_<metric> (train.generation.metrics) over the first train.generation.prompts validation prompts,
    greedy, each rank a share; and eval_slice/<value>/gen_<metric> per data.columns.slice value. Under ZeRO-3 on
    several ranks every forward is collective, so each rank generates the same number of batches (padding its share
    with copies of a prompt whose answers are discarded) in lockstep (synced)."""
    from raytune_ft.generation import answer_text, greedy_answers, stop_ids
    from raytune_ft.metrics import answer_scores

    gen = cfg.train.generation
    n = min(gen.prompts, len(val.get("prompts") or []))
    if n == 0:
        return {}
    mine = list(range(rank, n, world))
    prompts = [val["prompts"][i] for i in mine]
    prompts += [val["prompts"][0]] * (math.ceil(n / world) - len(mine))
    ids = greedy_answers(
        engine.module,
        prompts,
        max_new_tokens=gen.max_new_tokens,
        stop=stop_ids(tokenizer),
        pad_id=pad_id,
        batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
        synced=cfg.deepspeed.zero_stage == 3 and world > 1,
    )
    answers = [answer_text(tokenizer, row) for row in ids[: len(mine)]]
    scores = answer_scores(answers, [val["references"][i] for i in mine])
    table = torch.zeros((n, len(gen.metrics)), dtype=torch.float64)
    for i, row in zip(mine, scores, strict=True):
        table[i] = torch.tensor([row[m] for m in gen.metrics], dtype=torch.float64)
    if world > 1:
        device = next(engine.module.parameters()).device
        on_device = table.to(device)
        torch.distributed.all_reduce(on_device)
        table = on_device.cpu()
    metrics: dict[str, Any] = {f"eval_gen_{m}": float(table[:, k].mean()) for k, m in enumerate(gen.metrics)}
    if "slices" in val:
        values = val["slices"][:n]
        for value in sorted(set(values)):
            rows = torch.tensor([i for i, v in enumerate(values) if v == value])
            for k, m in enumerate(gen.metrics):
                metrics[f"eval_slice/{value}/gen_{m}"] = float(table[rows, k].mean())
    return metrics


@torch.no_grad()
def probe_generations(
    engine: Any, val: dict[str, list], cfg: ExperimentConfig, pad_id: int, tokenizer: Any, world: int
) -> dict[str, Any]:
    """Greedy answers to the first validation prompts, one batch, so an export can be checked to generate what the
    model that wrote the checkpoint generated. Every rank runs it (ZeRO-3's forwards are collective)."""
    from raytune_ft.generation import greedy_answers, stop_ids

    prompts = list(val.get("prompts") or [])[:PROBE_ROWS]
    if not prompts:
        return {}
    answers = greedy_answers(
        engine.module,
        prompts,
        max_new_tokens=cfg.train.generation.max_new_tokens,
        stop=stop_ids(tokenizer),
        pad_id=pad_id,
        batch_size=len(prompts),
        synced=cfg.deepspeed.zero_stage == 3 and world > 1,
    )
    return {"prompts": prompts, "answers": answers, "max_new_tokens": cfg.train.generation.max_new_tokens}


def _names(cfg: ExperimentConfig, classes: list[str]) -> list[str]:
    return list(cfg.data.label_names) if cfg.data.label_names else list(classes)


@torch.no_grad()
def probe_logits(engine: Any, val: dict[str, list], pad_id: int, device: torch.device) -> torch.Tensor:
    """Logits of the first validation rows, so an export can be checked against the model that wrote it."""
    engine.eval()
    rows = list(range(min(PROBE_ROWS, len(val["input_ids"]))))
    batch = collate(val, rows, pad_id, device)
    logits = engine(**model_inputs(batch)).logits.float().cpu()
    engine.train()
    return probe_slice(logits).contiguous()


def probe_slice(logits: torch.Tensor) -> torch.Tensor:
    """What of a probe's logits is kept: a classifier's all, a causal LM's first PROBE_POSITIONS positions."""
    return logits[:, :PROBE_POSITIONS] if logits.dim() == 3 else logits
