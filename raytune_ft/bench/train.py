"""`raytune-ft bench train`: the same model, data and global batch through a bare single-process PyTorch loop and
through the Ray Train + DeepSpeed loop, plus a no-op TorchTrainer to judge start-up against Ray Train's own; with
--packing (chat), the Ray Train + DeepSpeed loop on packed against padded rows."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import queue as queue_module
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from raytune_ft.bench.flops import mfu
from raytune_ft.config import ExperimentConfig
from raytune_ft.train.hooks import StepHooks

KEYS = ("samples_per_s", "tokens_per_s", "time_to_first_step_s", "peak_rss_mb")
# what --packing compares, packed over padded: real tokens, conversations and rows per second
PACKING_KEYS = ("tokens_per_s", "conversations_per_s", "samples_per_s")
VALIDATION_ROWS = 8


def bench_config(cfg: ExperimentConfig, steps: int, **sections: dict[str, Any]) -> ExperimentConfig:
    """The experiment as benchmarked: `steps` optimizer steps with nothing else in between; `sections` replace
    keys section by section (e.g. deepspeed={"zero_stage": 3})."""
    data = cfg.model_dump(mode="json", by_alias=True)
    data["train"].update(max_steps=steps, eval_every_steps=steps, checkpoint_every_steps=steps, early_stopping=None)
    for name, values in sections.items():
        data[name].update(values)
    return ExperimentConfig.model_validate(data)


def with_packing(cfg: ExperimentConfig, packing: bool) -> ExperimentConfig:
    """The chat experiment with data.chat.packing set to PACKING, the rest of data.chat as it was."""
    data = cfg.model_dump(mode="json", by_alias=True)
    data["data"]["chat"]["packing"] = packing
    return ExperimentConfig.model_validate(data)


def global_batch(cfg: ExperimentConfig) -> int:
    """Rows per optimizer step over all workers."""
    return cfg.train.batch_size * cfg.train.grad_accum * cfg.scaling.num_workers


def bench_rows(n: int, need: int, spread: bool) -> list[int]:
    """Which of N training rows the benchmark keeps when its steps read NEED: all of them when there are no more,
    else the first NEED or, SPREAD, NEED rows evenly spaced over the split. Packed rows need spreading: pack()
    opens rows longest example first, so the first rows hold the split's longest conversations and are fuller than
    the split's rows are on average."""
    if need >= n:
        return list(range(n))
    return [i * n // need for i in range(need)] if spread else list(range(need))


def run_header(cfg: ExperimentConfig, steps: int) -> dict[str, Any]:
    """What every bench train result starts with: which experiment, model, method, stage, workers and batch."""
    return {
        "experiment": cfg.name,
        "model": cfg.model.name_or_path,
        "finetune": cfg.finetune.method,
        "zero_stage": cfg.deepspeed.zero_stage,
        "workers": cfg.scaling.num_workers,
        "steps": steps,
        "global_batch": global_batch(cfg),
    }


def bench_data(
    data: dict[str, dict[str, list]], cfg: ExperimentConfig, steps: int, spread: bool | None = None
) -> tuple[dict, int]:
    """The training rows `steps` steps read (all of the split when it is smaller; see bench_rows, SPREAD by default
    for a packed split), a few validation rows, and the number of epochs that covers `steps`."""
    need = steps * global_batch(cfg)
    split = data["train"]
    keep = bench_rows(len(split["input_ids"]), need, "seq_lens" in split if spread is None else spread)
    train = {k: [v[i] for i in keep] for k, v in split.items()}
    n = len(train["input_ids"])
    epochs = math.ceil(steps / max(1, n // global_batch(cfg)))
    val = {k: v[:VALIDATION_ROWS] for k, v in data["validation"].items()}
    return {"train": train, "validation": val}, epochs


def _noop_loop(config: dict[str, Any]) -> None:
    """A Ray Train loop doing nothing but report when it started: Ray Train's own start-up."""
    import ray.train

    from raytune_ft.train.figures import report_figures

    report_figures({"first_step_at": time.time()}, ray.train.get_context().get_world_rank())


def step_counts(split: dict[str, list], micro_batches: list[list[int]], varlen: bool = False) -> dict[str, int]:
    """What one step's MICRO_BATCHES of SPLIT hold: examples (a packed row holds len(seq_lens) conversations, any
    other row one example), real tokens, and slots, the token positions the forward computes: each micro-batch is
    padded to its longest row (train.batches.collate), except packed rows in flash-attention's VARLEN layout,
    which are not padded at all."""
    packed = "seq_lens" in split
    examples = tokens = slots = 0
    for rows in micro_batches:
        lengths = [len(split["input_ids"][i]) for i in rows]
        examples += sum(len(split["seq_lens"][i]) for i in rows) if packed else len(rows)
        tokens += sum(lengths)
        slots += sum(lengths) if packed and varlen else len(rows) * max(lengths, default=0)
    return {"examples": examples, "tokens": tokens, "slots": slots}


class BenchFigures(StepHooks):
    """The benchmark's measurement of the training recipe, joined to it as a hook: at the last step, the figures
    `bench train`, `bench lm` and `bench train --zero-stages` read, reported instead of an evaluation and a
    checkpoint (the loop itself is measured; nothing is saved). MEASURE_MODEL_STATE: also model_state_mb, the
    gradients, parameters and optimizer states of the last step (the largest worker's).

    Besides the recipe's own rates, it counts the examples of the steps the recipe's SteadyClock times (every step
    after the first): examples_per_s (conversations per second for chat: a packed row holds several; the recipe
    counts rows) and batch_fill, real tokens / padded token positions of those steps."""

    def __init__(self, measure_model_state: bool = False) -> None:
        self.measure_model_state = measure_model_state
        self.model_state_mb: float | None = None
        self.counts = {"examples": 0, "tokens": 0, "slots": 0}

    def on_step_start(self, recipe: Any, step: int) -> None:
        """Count the examples of a step the clock times; the step's rows come from the recipe's own TaskMix, a pure
        function of seed and step, so asking for them again reads the rows the step is about to train on."""
        if recipe.clock.first_step_at is None:  # the first step only starts the clock (SteadyClock)
            return
        stream, micro_batches = recipe.mix.step(step, recipe.rank)
        for key, value in step_counts(stream.train, micro_batches, recipe.attention == "varlen").items():
            self.counts[key] += value

    def after_backward(self, recipe: Any, step: int) -> None:
        if self.measure_model_state and step == recipe.total - 1 and self.model_state_mb is None:
            from raytune_ft.train.evaluate import over_ranks
            from raytune_ft.train.measure import model_state_mb

            # gradients, parameters and optimizer states all exist now: the model-state peak of a step
            self.model_state_mb = over_ranks(model_state_mb(recipe.engine), recipe.world, recipe.device, "max")

    def on_step_end(self, recipe: Any, done: int) -> bool:
        if done < recipe.total:
            return False
        import torch

        from raytune_ft.train.evaluate import over_ranks
        from raytune_ft.train.figures import report_figures
        from raytune_ft.train.measure import peak_device_mb, peak_rss_mb

        world, device = recipe.world, recipe.device
        seconds = recipe.clock.seconds
        counts = self.counts
        # like recipe.rates(): each rank's count over its own seconds, summed over ranks (collectives on every rank)
        examples_per_s = over_ranks(counts["examples"] / seconds, world, device) * world if seconds else None
        batch_fill = over_ranks(counts["tokens"] / counts["slots"], world, device) if counts["slots"] else None
        report_figures(
            {
                "step": done,
                **recipe.rates(),
                "examples_per_s": examples_per_s,
                "batch_fill": batch_fill,
                "loop_started_at": recipe.started_at,
                "engine_ready_at": recipe.engine_ready_at,
                "first_step_at": recipe.clock.first_step_at,
                "peak_rss_mb": over_ranks(peak_rss_mb(), world, device, "max"),
                "rss_growth_mb": over_ranks(peak_rss_mb() - recipe.rss_at_start, world, device, "max"),
                "model_state_mb": self.model_state_mb,
                "peak_device_mb": peak_device_mb(device),
                **recipe.sizes,
                "precision": recipe.precision,
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            },
            recipe.rank,
        )
        return True


def bench_loop(measure_model_state: bool = False) -> Callable[[dict[str, Any]], None]:
    """The Ray Train loop as benchmarked: the training recipe with BenchFigures."""
    from raytune_ft.train.loop import train_loop

    return partial(train_loop, hooks=[BenchFigures(measure_model_state)])


def run_on_ray(
    cfg: ExperimentConfig, loop: Callable, loop_config: dict[str, Any], storage: str, name: str, stock: bool = False
) -> tuple[dict[str, Any], float]:
    """Fit once (STOCK: on Ray's own TorchTrainer); the worker-0 metrics and the wall time at which fit() was
    called."""
    from ray.train import RunConfig

    from raytune_ft.train.ray_run import torch_trainer

    trainer = torch_trainer(cfg, loop, loop_config, RunConfig(name=name, storage_path=storage), stock=stock)
    started = time.time()
    result = trainer.fit()
    return dict(result.metrics), started


def bare_loop(payload: dict[str, Any], queue: Any) -> None:
    """One process, no Ray, no DeepSpeed: the same model, rows, global batch, optimizer and regularisers."""
    import resource

    import torch

    from raytune_ft.modeling import EWC, build_model, estimate_fisher, l1_penalty, param_groups
    from raytune_ft.train.batches import StepPlan, collate
    from raytune_ft.train.ds_config import resolved_precision
    from raytune_ft.train.engine import enable_activation_checkpointing, make_optimizer
    from raytune_ft.train.evaluate import task_loss
    from raytune_ft.train.measure import SteadyClock

    torch.set_num_threads(payload["threads"])
    cfg = ExperimentConfig.model_validate(payload["experiment"])
    classes, train = payload["classes"] or [], payload["data"]["train"]
    use_cuda = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    precision = resolved_precision(cfg, use_cuda)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.finetune, len(classes) or None, cfg.data.label_names).to(device)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    weights = payload["class_weights"]
    class_weights = torch.tensor([weights[c] for c in classes], device=device) if classes and weights else None
    classification = cfg.model.task == "sequence-classification"

    def loss_of(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return task_loss(module, batch, classification, class_weights)

    # the same global batch in one process
    plan = StepPlan.of(cfg, train, 1, grad_accum=cfg.train.grad_accum * cfg.scaling.num_workers)
    pad_id = payload["pad_token_id"]
    # packed chat rows: collated as the recipe collates them (loop.Recipe.build_model); task_loss takes the chat
    # labels (label_loss) from the batch
    attention = "varlen" if cfg.model.attn_implementation == "flash_attention_2" else "block"
    ewc = None
    if cfg.finetune.ewc is not None:
        sample = plan.permutation(-1)[: cfg.finetune.ewc.fisher_samples].tolist()
        batches = [collate(train, sample[i : i + 8], pad_id, device) for i in range(0, len(sample), 8)]
        ewc = EWC(model, estimate_fisher(model, batches, loss_of, len(sample)), cfg.finetune.ewc.strength)
    groups = param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.finetune.layerwise_lr_decay)
    optimizer = make_optimizer(cfg, groups, use_cuda)
    params = [p for p in model.parameters() if p.requires_grad]
    mixed = use_cuda and precision in ("bf16", "fp16")
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    clock = SteadyClock()
    perm_epoch, perm = -1, None
    for step in range(plan.total_steps):
        began = time.perf_counter()
        samples = tokens = 0
        epoch = step // plan.steps_per_epoch
        if epoch != perm_epoch:
            perm_epoch, perm = epoch, plan.permutation(epoch)
        micro = plan.micro_batches(step, 0, perm)
        for rows in micro:
            batch = collate(train, rows, pad_id, device, attention)
            with torch.autocast("cuda", dtype=half) if mixed else contextlib.nullcontext():
                loss = loss_of(model, batch)
            if cfg.finetune.l1:
                loss = loss + cfg.finetune.l1 * l1_penalty(model)
            if ewc is not None:
                loss = loss + ewc.penalty(model)
            (loss / len(micro)).backward()
            samples += len(rows)
            # real lengths, as the recipe counts them: a packed batch's attention_mask is 4D and additive
            tokens += sum(len(train["input_ids"][i]) for i in rows)
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if use_cuda:
            torch.cuda.synchronize()
        clock.step_done(began, samples, tokens)
    queue.put(
        {
            "samples_per_s": clock.samples / clock.seconds if clock.seconds else None,
            "tokens_per_s": clock.tokens / clock.seconds if clock.seconds else None,
            "first_step_at": clock.first_step_at,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads(),
            "device": str(device),
        }
    )


def run_in_fresh_process(target: Callable, payload: dict[str, Any], what: str, timeout_s: float = 3600) -> dict:
    """TARGET(payload, queue) in a fresh process, so that its start-up and peak memory are its own, not this
    driver's; what it put on the queue, with time_to_first_step_s from the process start."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    started = time.time()
    proc = ctx.Process(target=target, args=(payload, queue), daemon=True)
    proc.start()
    found = None
    while found is None and time.time() - started < timeout_s:
        try:
            found = queue.get(timeout=1)
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the {what} died (exit code {proc.exitcode}); see its error above") from None
    proc.join(60)
    if found is None:
        proc.kill()
        raise RuntimeError(f"the {what} did not finish in {timeout_s:.0f} s")
    found["time_to_first_step_s"] = found.pop("first_step_at") - started
    return found


def bench_throughput(
    cfg: ExperimentConfig, steps: int, log: Callable[[str], None] = print, peak_tflops: float | None = None
) -> dict[str, Any]:
    """Samples/s, tokens/s, time to first step and peak memory: bare loop (a) vs Ray Train + DeepSpeed (b)."""
    import ray

    from raytune_ft.train.trainer import prepare_worker_data

    if steps < 2:
        raise ValueError("--steps must be at least 2: the first step is start-up, the rest are timed")
    log("preparing data")
    worker_data = prepare_worker_data(cfg)
    data, epochs = bench_data(worker_data["data"], cfg, steps)
    bcfg = bench_config(cfg, steps, train={"epochs": epochs})
    shared = {
        "experiment": bcfg.model_dump(mode="json", by_alias=True),
        "classes": worker_data["classes"],
        "class_weights": worker_data["class_weights"],
        "pad_token_id": worker_data["pad_token_id"],
    }
    with tempfile.TemporaryDirectory(prefix="raytune-ft-bench-") as storage:
        log(f"no-op loop on Ray's own TorchTrainer, {cfg.scaling.num_workers} worker(s)")
        _fresh_ray(cfg)
        noop, noop_started = run_on_ray(bcfg, _noop_loop, {}, storage, "noop", stock=True)
        log(f"Ray Train + DeepSpeed loop: {steps} steps of {global_batch(cfg)} samples")
        _fresh_ray(cfg)
        ray_metrics, ray_started = run_on_ray(bcfg, bench_loop(), {**shared, "data": ray.put(data)}, storage, "ray")
    threads = max(1, min(multiprocessing.cpu_count(), round(cfg.scaling.cpus_per_worker * cfg.scaling.num_workers)))
    log(f"bare PyTorch loop in one process ({threads} thread(s)): the same steps")
    bare = run_in_fresh_process(bare_loop, {**shared, "data": data, "threads": threads}, "bare PyTorch loop")
    ray_side = {k: ray_metrics.get(k) for k in ("samples_per_s", "tokens_per_s", "peak_rss_mb")}
    ray_side["time_to_first_step_s"] = ray_metrics["first_step_at"] - ray_started
    ray_side["startup_s"] = {
        "ray_train_until_loop": ray_metrics["loop_started_at"] - ray_started,
        "loop_until_engine": ray_metrics["engine_ready_at"] - ray_metrics["loop_started_at"],
        "engine_until_first_step": ray_metrics["first_step_at"] - ray_metrics["engine_ready_at"],
    }
    ray_side["mfu"] = mfu(ray_metrics, cfg.scaling.num_workers, peak_tflops)
    noop_ttfs = noop["first_step_at"] - noop_started
    return {
        **run_header(cfg, steps),
        "params": ray_metrics.get("n_params"),
        "trainable_params": ray_metrics.get("n_trainable"),
        "device": ray_metrics.get("device"),
        "precision": ray_metrics.get("precision"),
        "bare": {**{k: bare[k] for k in KEYS}, "threads": bare["threads"]},
        "ray": ray_side,
        "ratio": _ratio(ray_side["samples_per_s"], bare["samples_per_s"]),
        "ratios": {k: _ratio(ray_side[k], bare[k]) for k in KEYS},
        "noop_time_to_first_step_s": noop_ttfs,
        "startup_vs_noop": _ratio(ray_side["time_to_first_step_s"], noop_ttfs),
    }


def unpacked_train(cfg: ExperimentConfig, worker_data: dict[str, Any]) -> dict[str, list]:
    """The chat experiment's training conversations one per row. The data step runs with the experiment as
    configured, never with data.chat.packing flipped: the split's fingerprint (data.pipeline.split_fingerprint)
    holds all of data.chat, so a flipped flag would build, or refuse, a data directory the experiment's own runs
    then refuse. A packed split is tokenised again, unpacked, from the same training table."""
    if not cfg.data.chat.packing:
        return worker_data["data"]["train"]
    from raytune_ft.data import load_split
    from raytune_ft.model_source import load_tokenizer
    from raytune_ft.train.batches import tokenize_splits

    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    tables = {"train": load_split(worker_data["data_dir"], "train")}
    chat = with_packing(cfg, False).data.chat
    return tokenize_splits(tables, tokenizer, "chat", cfg.data.max_length, cfg.data.block_size, chat, cfg.seed)["train"]


def bench_packing(cfg: ExperimentConfig, steps: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`bench train --packing`: the Ray Train + DeepSpeed loop (the training recipe with BenchFigures) on a chat
    experiment's training conversations, packed into data.block_size rows (data.chat.packing true) and one per row
    (false), the same steps, micro-batch and workers. Per mode: tokens_per_s (real tokens, not padding),
    conversations_per_s (counted by BenchFigures over the timed steps' rows: a packed row holds len(seq_lens)
    conversations), samples_per_s (rows), batch_fill; the packed/padded speed-up of each rate; and compare_fill
    on all of the training split's conversation lengths (each padded to block_size, as the fill ratio is defined;
    the padded loop pads each micro-batch only to its longest row, which batch_fill measures)."""
    import ray

    from raytune_ft.train.packing import compare_fill, packed_columns
    from raytune_ft.train.trainer import prepare_worker_data

    if cfg.model.task != "chat":
        raise ValueError(
            f"--packing compares packed against padded chat batches; {cfg.name} has model.task "
            f"'{cfg.model.task}', not chat"
        )
    if steps < 2:
        raise ValueError("--steps must be at least 2: the first step is start-up, the rest are timed")
    log("preparing data")
    worker_data = prepare_worker_data(cfg)
    train, val = unpacked_train(cfg, worker_data), worker_data["data"]["validation"]
    block = cfg.data.block_size
    # the same conversations in both modes, packed as tokenize_splits packs them with data.chat.packing
    splits = {
        "padded": train,
        "packed": packed_columns(train["input_ids"], train["labels"], block, cfg.seed),
    }
    fill = compare_fill([len(ids) for ids in train["input_ids"]], block)
    shared = {
        "classes": worker_data["classes"],
        "class_weights": worker_data["class_weights"],
        "pad_token_id": worker_data["pad_token_id"],
    }
    runs: dict[str, dict[str, Any]] = {}
    metrics: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="raytune-ft-bench-") as storage:
        for mode, split in splits.items():
            # rows spread over the split in both modes, so that neither reads only the file's first conversations
            data, epochs = bench_data({"train": split, "validation": val}, cfg, steps, spread=True)
            bcfg = bench_config(with_packing(cfg, mode == "packed"), steps, train={"epochs": epochs})
            log(f"Ray Train + DeepSpeed loop, {mode}: {steps} steps of {global_batch(cfg)} rows")
            _fresh_ray(cfg)
            loop_config = {**shared, "experiment": bcfg.model_dump(mode="json", by_alias=True), "data": ray.put(data)}
            metrics, started = run_on_ray(bcfg, bench_loop(), loop_config, storage, mode)
            rows = data["train"]
            runs[mode] = {
                "tokens_per_s": metrics.get("tokens_per_s"),
                "conversations_per_s": metrics.get("examples_per_s"),
                "samples_per_s": metrics.get("samples_per_s"),
                "batch_fill": metrics.get("batch_fill"),
                "rows": len(rows["input_ids"]),
                "conversations": step_counts(rows, [list(range(len(rows["input_ids"])))])["examples"],
                "time_to_first_step_s": metrics["first_step_at"] - started,
                "peak_rss_mb": metrics.get("peak_rss_mb"),
            }
    return {
        **run_header(cfg, steps),
        "block_size": block,
        "device": metrics.get("device"),
        "precision": metrics.get("precision"),
        "fill": fill,
        **runs,
        "speedup": speedups(runs["packed"], runs["padded"]),
    }


def speedups(packed: dict[str, Any], padded: dict[str, Any]) -> dict[str, float | None]:
    """Packed / padded of each rate in PACKING_KEYS (None where either is missing)."""
    return {k: _ratio(packed.get(k), padded.get(k)) for k in PACKING_KEYS}


def _fresh_ray(cfg: ExperimentConfig) -> None:
    """On an embedded local Ray, each measured trainer gets a new Ray instance, so that both pay the same cold
    start a user's `raytune-ft train` pays; a remote cluster is joined once and stays as it is."""
    import ray

    from raytune_ft.train.ray_cluster import ensure_ray

    if cfg.cluster.address is None and ray.is_initialized():
        ray.shutdown()
    ensure_ray(cfg)


def _ratio(b: float | None, a: float | None) -> float | None:
    """B / A, None when either is missing or A is 0."""
    return b / a if a and b is not None else None
