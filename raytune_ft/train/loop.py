"""The per-worker training loop that Ray Train runs: one readable recipe wiring the small components.

Same code on 1 worker, N workers on one node and N nodes: data come through Ray's object store, checkpoints
through Ray Train's storage, the process group is set up by TorchTrainer (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from raytune_ft.config.schema import ExperimentConfig
from raytune_ft.train.batches import StepPlan, collate
from raytune_ft.train.checkpoint import (
    DS_TAG,
    STATE,
    TRAINABLE,
    CheckpointError,
    check_same_model,
    checkpoint_name,
    config_hash,
    list_checkpoints,
    model_record,
    newest_whole_checkpoint,
    verify_checkpoint,
    weights_only_loads,
    write_manifest,
)
from raytune_ft.train.ds_config import deepspeed_config, import_deepspeed, resolved_precision
from raytune_ft.train.engine import enable_activation_checkpointing, make_optimizer, start_engine
from raytune_ft.train.evaluate import evaluate, over_ranks, probe_logits, task_loss
from raytune_ft.train.figures import report_figures
from raytune_ft.train.measure import SteadyClock, model_sizes, model_state_mb, peak_device_mb, peak_rss_mb, rss_mb
from raytune_ft.train.task_mix import TaskMix, TaskStream


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def _group_lambda(step: int, *, label: str, gate: Any, total: int, warmup: int, kind: str) -> float:
    return lr_factor(step, total, warmup, kind) * gate(label, step)


class EarlyStopping:
    def __init__(self, mode: str, patience: int, min_delta: float) -> None:
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.best: float | None = None
        self.bad_evals = 0

    def update(self, value: float) -> bool:
        """Record one evaluation; True when patience has run out."""
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def restore(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals = state.get("best"), state.get("bad_evals", 0)


def train_loop(config: dict[str, Any]) -> None:
    loop_started_at = time.time()
    import ray
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_file, save_file

    from raytune_ft.modeling import (
        EWC,
        build_model,
        estimate_fisher,
        l1_penalty,
        num_layers,
        param_groups,
        unfreeze_gate,
    )

    rss_at_start = rss_mb()
    cfg = ExperimentConfig.model_validate(config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    classification = cfg.model.task == "sequence-classification"
    classes: list[str] = config["classes"] or []
    data = ray.get(config["data"])
    train, val = data["train"], data["validation"]
    pad_id: int = config["pad_token_id"]

    precision = resolved_precision(cfg, torch.cuda.is_available())
    ds_config = deepspeed_config(cfg, precision, _hidden_size(cfg))
    if cfg.deepspeed.zero_stage == 3:
        import_deepspeed()  # before transformers' DeepSpeed integration imports it
        from transformers.integrations import HfDeepSpeedConfig

        # While this object lives, from_pretrained builds the model already partitioned (deepspeed.zero.Init):
        # no worker ever holds the whole model, so ZeRO-3 fits models larger than one worker's memory.
        # (held in a local: transformers keeps only a weak reference)
        _zero3_init = HfDeepSpeedConfig(ds_config)
    torch.manual_seed(cfg.seed)  # identical initial heads on every rank
    model = build_model(cfg.model, cfg.finetune, len(classes) or None, cfg.data.label_names)
    tasks = config.get("tasks") or []
    if tasks:
        from raytune_ft.modeling.multitask import MultiTaskModel, TaskHead

        heads = [TaskHead(t["name"], t["task"], len(t["classes"] or []) or None) for t in tasks]
        model = MultiTaskModel(model, cfg.multitask.primary, heads)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    # which model this run trains: written into every checkpoint's state, compared before one is loaded
    config["model_record"] = model_record(model, cfg.model.name_or_path)
    plan = StepPlan.of(cfg, train, world)
    plan.check()
    # several tasks share the steps, so their count is train.max_steps (the config requires it), not epochs
    total = cfg.train.max_steps if tasks else plan.total_steps
    config["steps_per_epoch"] = plan.steps_per_epoch
    eval_every = cfg.train.eval_every_steps or plan.steps_per_epoch
    ckpt_every = cfg.train.checkpoint_every_steps or eval_every
    class_weights = (
        torch.tensor([config["class_weights"][c] for c in classes], dtype=torch.float32, device=device)
        if classification and config.get("class_weights")
        else None
    )

    loss_of = partial(task_loss, classification=classification, class_weights=class_weights)
    primary = TaskStream(
        cfg.multitask.primary if tasks else None,
        plan,
        train,
        val,
        loss_of,
        cfg.multitask.primary_loss_weight if tasks else 1.0,
        classes,
        cfg.data.label_names,
    )
    extras = [_task_stream(t, i, cfg, world) for i, t in enumerate(tasks)]
    mix = TaskMix(primary, extras, total, cfg.multitask.sampling, cfg.multitask.temperature, cfg.seed)
    config["total_steps"] = total

    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("restore_from"):
        # a checkpoint from outside this run (a Tune trial restarting, or exploiting a PBT donor); the run's
        # own checkpoints, written after it, win when Ray Train restarts the workers
        source = config["restore_from"]
        ckpt = source if isinstance(source, ray.train.Checkpoint) else ray.train.Checkpoint(source)
    newest_own = None
    if config.get("run_storage"):
        # Ray Train registers a checkpoint when its controller next polls the workers (every 2 s): a worker that
        # dies sooner leaves a whole checkpoint in this run's storage that Ray does not hand back. Use the newest.
        known = Path(ckpt.path).name if ckpt is not None else ""  # Ray's latest, or the restore (always older)
        own = [p for p in list_checkpoints(Path(config["run_storage"])) if p.name > known]
        newest_own = newest_whole_checkpoint(own, log=lambda m: _log(rank, m))
        if newest_own is not None:
            ckpt = ray.train.Checkpoint(str(newest_own[0]))
    resume_dir: Path | None = None
    state: dict[str, Any] = {}
    if ckpt is not None:
        local = Path(ckpt.to_directory()) if not Path(ckpt.path).is_dir() else Path(ckpt.path)
        try:
            state = newest_own[1] if newest_own is not None else verify_checkpoint(local)  # verified once
            resume_dir = local
        except CheckpointError as exc:
            _log(rank, f"newest checkpoint is not whole ({exc}); looking for an older one")
            found = newest_whole_checkpoint(
                [p for p in list_checkpoints(local.parent) if p.name < local.name], log=lambda m: _log(rank, m)
            )
            if found is None:
                raise CheckpointError(f"no whole checkpoint to resume from in {local.parent}") from exc
            resume_dir, state = found
            _log(rank, f"resuming from the previous good checkpoint {resume_dir.name}")
        # another model's checkpoint is refused by name here, not by a shape mismatch inside DeepSpeed's loader
        check_same_model(resume_dir, state, config["model_record"])
        if state.get("world_size") != world:
            raise CheckpointError(
                f"{resume_dir}: saved with {state.get('world_size')} workers, resumed with {world}; "
                "ZeRO shards need the same number of workers (set scaling.num_workers)"
            )
        if state.get("config_hash") != config_hash(config["experiment"]):
            _log(rank, "the config differs from the checkpoint's (e.g. a PBT exploit): its hyper-parameters apply")
    elif config.get("require_checkpoint"):
        raise CheckpointError("resume was asked for but the run has no checkpoint")
    if resume_dir is not None and (state.get("finished") or int(state["step"]) >= total):
        # Nothing left to train (a Tune trial restarted after a final report its driver never received, workers
        # lost after the last save): report that checkpoint again, so the run ends on its final result.
        _log(rank, f"{resume_dir.name} is the last checkpoint (step {state['step']} of {total}); nothing to train")
        _report_again(resume_dir, {**state["metrics"], "resumed_step": int(state["step"])}, rank)
        return

    ewc = None
    if cfg.finetune.ewc is not None:
        if resume_dir is not None:
            ewc = EWC.from_tensors(model, load_file(str(resume_dir / "ewc.safetensors")), cfg.finetune.ewc.strength)
        else:
            # Fisher of the pre-trained weights, from this rank's slice of a fixed sample, averaged over ranks.
            sample = plan.permutation(-1)[: cfg.finetune.ewc.fisher_samples].tolist()[rank::world]
            batches = [collate(train, sample[i : i + 8], pad_id, torch.device("cpu")) for i in range(0, len(sample), 8)]
            fisher = estimate_fisher(model, batches, loss_of, cfg.finetune.ewc.fisher_samples)
            if world > 1:
                for tensor in fisher.values():
                    on_device = tensor.to(device)  # NCCL reduces CUDA tensors only
                    torch.distributed.all_reduce(on_device)
                    tensor.copy_(on_device.cpu() / world)
            ewc = EWC(model, fisher, cfg.finetune.ewc.strength)

    groups = param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.finetune.layerwise_lr_decay)
    gate = unfreeze_gate(cfg.finetune.gradual_unfreeze, num_layers(model))
    optimizer = make_optimizer(cfg, groups, device.type == "cuda")
    configured = [(g["lr"], g["weight_decay"]) for g in groups]  # before the scheduler scales lr
    warmup = round(cfg.train.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [
            partial(_group_lambda, label=g["group"], gate=gate, total=total, warmup=warmup, kind=cfg.train.lr_schedule)
            for g in groups
        ],
    )
    sizes = model_sizes(model)
    engine = start_engine(cfg, model, optimizer, scheduler, ds_config)

    engine_ready_at = time.time()
    stopper = EarlyStopping(*_stop_settings(cfg))
    history: list[dict[str, Any]] = []
    start = 0
    resumed: dict[str, Any] = {}
    if resume_dir is not None:
        load_began = time.perf_counter()
        frozen = any(not p.requires_grad for p in engine.module.parameters())
        with weights_only_loads():  # DeepSpeed itself would unpickle anything in these files
            load_path, _ = engine.load_checkpoint(
                str(resume_dir), tag=DS_TAG, load_lr_scheduler_states=True, load_module_strict=not frozen
            )
        if load_path is None:  # DeepSpeed returns quietly when it finds nothing
            raise CheckpointError(f"{resume_dir}: DeepSpeed found no checkpoint under tag '{DS_TAG}'")
        apply_configured_hyperparameters(scheduler, configured)
        rng = load_file(str(resume_dir / f"rng.rank{rank}.safetensors"))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        start = int(state["step"])
        stopper.restore(state.get("early_stopping", {}))
        history = list(state.get("history", []))
        resumed = {"resumed_step": start, "load_checkpoint_s": time.perf_counter() - load_began}
        _log(rank, f"resumed at step {start} of {total} from {resume_dir.name}")

    retain = ray.get(config["retain"]) if config.get("retain") else None
    if retain is not None:
        # the retain set's score before any step of this run (the pre-trained model; kept across resumes), the
        # reference every evaluation's eval_retain_worse_by is measured against
        config["retain_base"] = state.get("retain_base")
        if config["retain_base"] is None:
            config["retain_base"] = _retain_score(engine, retain, rank, world, cfg, classes, pad_id, device)
    fault = config.get("fault") or {}
    engine.train()
    running, micro_count = 0.0, 0
    clock = SteadyClock()
    state_mb = None
    for step in range(start, total):
        step_began = time.perf_counter()
        step_samples = step_tokens = 0
        stream, micro_batches = mix.step(step, rank)
        if fault.get("raise_at_step") == step:
            raise RuntimeError(f"fault injected: interrupted at step {step}")
        _kill_once(fault, "kill_at_step", step, rank, f"killed rank {rank} at step {step}")
        for rows in micro_batches:
            batch = collate(stream.train, rows, pad_id, device)
            loss = stream.loss(engine, batch)
            if stream.weight != 1.0:
                loss = loss * stream.weight
            if cfg.finetune.l1:
                loss = loss + cfg.finetune.l1 * l1_penalty(engine.module)
            if ewc is not None:
                loss = loss + ewc.penalty(engine.module)
            engine.backward(loss)
            if config.get("measure_model_state") and step == total - 1 and state_mb is None:
                # gradients, parameters and optimizer states all exist now: the model-state peak of a step
                state_mb = over_ranks(model_state_mb(engine), world, device, "max")
            engine.step()
            running += loss.detach()  # a tensor: reading it (a device sync) waits until the next report
            micro_count += 1
            step_samples += len(rows)
            step_tokens += int(batch["attention_mask"].sum())
        if device.type == "cuda":
            torch.cuda.synchronize()  # a step's time is its kernels', not how fast Python queued them
        clock.step_done(step_began, step_samples, step_tokens)
        done = step + 1
        last = done == total
        if config.get("bench") and last:
            # Benchmark runs measure the loop itself: no evaluation, no model checkpoint.
            report_figures(
                {
                    "step": done,
                    "samples_per_s": _per_second(clock.samples, clock.seconds, world, device),
                    "tokens_per_s": _per_second(clock.tokens, clock.seconds, world, device),
                    "loop_started_at": loop_started_at,
                    "engine_ready_at": engine_ready_at,
                    "first_step_at": clock.first_step_at,
                    "peak_rss_mb": over_ranks(peak_rss_mb(), world, device, "max"),
                    "rss_growth_mb": over_ranks(peak_rss_mb() - rss_at_start, world, device, "max"),
                    "model_state_mb": state_mb,
                    "peak_device_mb": peak_device_mb(device),
                    **sizes,
                    "precision": precision,
                    "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                },
                rank,
            )
            break
        if not (done % eval_every == 0 or done % ckpt_every == 0 or last):
            continue
        metrics = evaluate(engine, val, rank, world, cfg, classes, pad_id, device)
        if extras:
            metrics.update(task_metrics(engine, mix, metrics, rank, world, cfg, pad_id, device))
        if retain is not None:
            metrics.update(
                retain_metrics(engine, retain, config["retain_base"], rank, world, cfg, classes, pad_id, device)
            )
        metrics.update(
            step=done,
            epoch=round(done / plan.steps_per_epoch, 4),
            train_loss=over_ranks(float(running) / max(1, micro_count), world, device),
            lr=scheduler.get_last_lr()[0],
            samples_per_s=_per_second(clock.samples, clock.seconds, world, device),
            tokens_per_s=_per_second(clock.tokens, clock.seconds, world, device),
            first_step_at=clock.first_step_at,
            peak_rss_mb=over_ranks(peak_rss_mb(), world, device, "max"),
        )
        metrics.update(resumed)  # the first report after a resume says where it resumed and what loading cost
        resumed = {}
        running, micro_count = 0.0, 0
        stop_key = cfg.train.early_stopping.metric if cfg.train.early_stopping else None
        should_stop = False
        if stop_key is not None:
            if stop_key not in metrics:
                raise KeyError(
                    f"train.early_stopping.metric '{stop_key}' is not reported; choose from {sorted(metrics)}"
                )
            should_stop = stopper.update(float(metrics[stop_key]))
        metrics["early_stopped"] = should_stop
        metrics["total_steps"] = config["total_steps"]  # so a reader can tell a finished run from a stopped one
        history.append({k: v for k, v in metrics.items() if "/" not in k})
        if rank == 0:
            _log(rank, progress_line(metrics, total, plan.global_batch))
        if done % ckpt_every == 0 or last or should_stop:
            _save_and_report(
                engine, metrics, config, cfg, rank, world, done, stopper, ewc, val, pad_id, device, save_file, history
            )
        else:
            ray.train.report(metrics)
        if should_stop:
            _log(rank, f"early stopping at step {done}: {stop_key} did not improve for {stopper.patience} evaluations")
            break


def apply_configured_hyperparameters(scheduler: Any, configured: list[tuple[float, float]]) -> None:
    """After loading a checkpoint, this run's learning rates and weight decay win over the saved ones: PBT
    explores by restoring a donor's checkpoint under changed hyper-parameters. Unchanged values are a no-op."""
    groups = scheduler.optimizer.param_groups
    for group, (lr, weight_decay) in zip(groups, configured, strict=True):
        group["initial_lr"], group["weight_decay"] = lr, weight_decay
    scheduler.base_lrs = [lr for lr, _ in configured]
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def _per_second(count: int, seconds: float, world: int, device: torch.device) -> float | None:
    """Summed over workers: each rank's count over its own steady-state seconds."""
    return over_ranks(count / seconds, world, device) * world if seconds else None


def _hidden_size(cfg: ExperimentConfig) -> int | None:
    from transformers import AutoConfig

    from raytune_ft.model_source import resolve_model_source

    config = AutoConfig.from_pretrained(
        resolve_model_source(cfg.model.name_or_path),
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model", None)
    return int(size) if size else None


def _task_stream(task: dict[str, Any], index: int, cfg: ExperimentConfig, world: int) -> TaskStream:
    """An extra task of a multi-task run: its own rows, shuffled with its own seed, its head's loss."""
    import ray

    data = ray.get(task["data"])
    plan = StepPlan(
        n_train=len(data["train"]["input_ids"]),
        micro_batch=cfg.train.batch_size,
        world_size=world,
        grad_accum=cfg.train.grad_accum,
        epochs=cfg.train.epochs,
        max_steps=None,
        seed=cfg.seed + 1 + index,
    )
    try:
        plan.check()
    except ValueError as exc:
        raise ValueError(f"task '{task['name']}': {exc}") from None
    classification = task["task"] == "sequence-classification"
    loss = partial(task_loss, classification=classification, class_weights=None, task=task["name"])
    val = {k: v for k, v in data["validation"].items() if k != "slices"}  # slices are the primary task's
    return TaskStream(
        task["name"], plan, data["train"], val, loss, task["loss_weight"], task["classes"] or [], task["label_names"]
    )


def task_metrics(
    engine: Any,
    mix: TaskMix,
    primary: dict[str, Any],
    rank: int,
    world: int,
    cfg: ExperimentConfig,
    pad_id: int,
    device: torch.device,
) -> dict[str, Any]:
    """eval_<task>_loss, _accuracy, _f1_macro or _perplexity per extra task, and eval_combined_loss: the
    loss-weighted mean of every task's validation loss, the objective Tune can optimise for all tasks at once."""
    out: dict[str, Any] = {}
    weighted, weights = mix.primary.weight * primary["eval_loss"], mix.primary.weight
    for stream in mix.streams.values():
        if stream is mix.primary:
            continue
        got = evaluate(
            engine, stream.val, rank, world, cfg, stream.classes, pad_id, device, task=stream.name, names=stream.names
        )
        for key in ("eval_loss", "eval_accuracy", "eval_f1_macro", "eval_perplexity"):
            if key in got:
                out[f"eval_{stream.name}_{key.removeprefix('eval_')}"] = got[key]
        weighted += stream.weight * got["eval_loss"]
        weights += stream.weight
    out["eval_combined_loss"] = weighted / weights
    return out


def _retain_score(
    engine: Any,
    retain: dict,
    rank: int,
    world: int,
    cfg: ExperimentConfig,
    classes: list[str],
    pad_id: int,
    device: Any,
) -> float:
    scored = evaluate(engine, retain, rank, world, cfg, classes, pad_id, device)
    return scored["eval_accuracy"] if classes else scored["eval_perplexity"]


def retain_metrics(
    engine: Any,
    retain: dict,
    base: float,
    rank: int,
    world: int,
    cfg: ExperimentConfig,
    classes: list[str],
    pad_id: int,
    device: Any,
) -> dict[str, Any]:
    """eval_retain_accuracy (classifier) or eval_retain_perplexity (causal LM) on train.retain_path, and
    eval_retain_worse_by: how much worse than before the first step (positive = forgotten), what
    tune.max_forgetting stops a trial on."""
    from raytune_ft.evaluation.scoring import forgetting

    metric = "accuracy" if classes else "perplexity"
    value = _retain_score(engine, retain, rank, world, cfg, classes, pad_id, device)
    return {
        f"eval_retain_{metric}": value,
        "eval_retain_before": base,
        "eval_retain_worse_by": forgetting(base, value, metric)["worse_by"],
    }


def _stop_settings(cfg: ExperimentConfig) -> tuple[str, int, float]:
    es = cfg.train.early_stopping
    return (es.mode, es.patience, es.min_delta) if es else ("min", 10**9, 0.0)


def _save_and_report(
    engine: Any,
    metrics: dict[str, Any],
    config: dict[str, Any],
    cfg: ExperimentConfig,
    rank: int,
    world: int,
    step: int,
    stopper: EarlyStopping,
    ewc: Any,
    val: dict[str, list],
    pad_id: int,
    device: torch.device,
    save_file: Any,
    history: list[dict[str, Any]],
) -> None:
    import json

    import ray.train

    deepspeed = import_deepspeed()

    tmp = Path(tempfile.mkdtemp(prefix=f"raytune-ft-ckpt-r{rank}-"))
    # Frozen weights are the pre-trained ones every process loads anyway: a LoRA checkpoint holds megabytes.
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if cfg.deepspeed.zero_stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
            tensors = {n: p.detach().float().cpu().clone() for n, p in trainable}
    else:
        tensors = {n: p.detach().float().cpu().clone() for n, p in trainable}
    probe = probe_logits(engine, val, pad_id, device)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / f"rng.rank{rank}.safetensors"))
    if rank == 0:
        save_file(tensors, str(tmp / TRAINABLE))
        save_file({"logits": probe}, str(tmp / "probe_logits.safetensors"))
        if ewc is not None:
            save_file(ewc.state_tensors(), str(tmp / "ewc.safetensors"))
        state = {
            "step": step,
            "epoch": metrics["epoch"],
            "world_size": world,
            "zero_stage": cfg.deepspeed.zero_stage,
            "config_hash": config_hash(config["experiment"]),
            "model": config.get("model_record"),
            "metrics": metrics,
            "early_stopping": stopper.state(),
            "history": history,
            # where the data stream stands: the next step reads rows from this epoch's permutation at this offset
            "data_position": {
                "epoch": step // config["steps_per_epoch"],
                "step_in_epoch": step % config["steps_per_epoch"],
            },
            "total_steps": config["total_steps"],
            "retain_base": config.get("retain_base"),
            # under Tune: which trial wrote this and with which sampled values (PBT's exploit record reads them)
            "trial_id": config.get("trial", {}).get("id"),
            "trial_config": config.get("trial", {}).get("config"),
            "finished": step >= config["total_steps"] or bool(metrics.get("early_stopped")),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / STATE).write_text(json.dumps(state, indent=1, default=float))
    for extra in ("zero_to_fp32.py", "zero_to_torch.py"):
        (tmp / extra).unlink(missing_ok=True)  # DeepSpeed's helper scripts: code, not state
    _kill_once(
        config.get("fault") or {},
        "kill_in_checkpoint_at_step",
        step,
        rank,
        f"killed rank {rank} while writing checkpoint {step}",
    )
    write_manifest(tmp, rank)
    ray.train.report(
        metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)), checkpoint_dir_name=checkpoint_name(step)
    )
    shutil.rmtree(tmp, ignore_errors=True)


def _report_again(checkpoint: Path, metrics: dict[str, Any], rank: int) -> None:
    """Rank 0 reports a copy (the checkpoint may sit where Ray Train would write it); the other ranks the metrics."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    tmp = Path(tempfile.mkdtemp(prefix="raytune-ft-ckpt-again-"))
    shutil.copytree(checkpoint, tmp, dirs_exist_ok=True)
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
        checkpoint_dir_name=checkpoint_name(int(metrics["step"])),
    )
    shutil.rmtree(tmp, ignore_errors=True)


def _kill_once(fault: dict[str, Any], kind: str, step: int, rank: int, what: str) -> None:
    """Tests' fault injection: SIGKILL this worker when FAULT names this step for KIND on this rank, once per run
    (the marker file FAULT["marker"].KIND says it happened, and the restarted workers pass the step again)."""
    if fault.get(kind) != step or fault.get("rank", 0) != rank:
        return
    marker = Path(f"{fault['marker']}.{kind}")
    if not marker.exists():
        marker.write_text(what + "\n")
        os.kill(os.getpid(), signal.SIGKILL)


def progress_line(metrics: dict[str, Any], total: int, global_batch: int) -> str:
    """What a person follows during a run: step, losses, the headline metrics, speed and time left."""
    done = metrics["step"]
    shown = [f"step {done}/{total}", f"train_loss {metrics['train_loss']:.4f}"]
    for key in ("eval_loss", "eval_accuracy", "eval_f1_macro", "eval_whole_accuracy", "eval_perplexity"):
        if key in metrics:
            shown.append(f"{key} {metrics[key]:.4f}")
    rate = metrics.get("samples_per_s") or 0
    if rate > 0:
        shown.append(f"{rate:.1f} samples/s, ETA {(total - done) * global_batch / rate / 60:.1f} min")
    return " | ".join(shown)


def _log(rank: int, message: str) -> None:
    print(f"[raytune-ft rank {rank}] {message}", flush=True)
