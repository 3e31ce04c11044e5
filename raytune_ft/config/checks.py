"""Rules that span several fields or sections, checked after each section is valid on its own."""

from __future__ import annotations

import os

from pydantic import BaseModel

from raytune_ft.config.algorithms import ALGORITHMS
from raytune_ft.config.schema import (
    CAUSAL_TASKS,
    ChoiceDim,
    ExperimentConfig,
    GridDim,
    IntDim,
    LogUniformDim,
    TuneConfig,
    UniformDim,
    nested_models,
)

SCHEDULER_TITLES = {"asha": "ASHA", "hyperband": "HyperBand", "median": "median-stopping"}
CONDITIONAL_ALGORITHMS = tuple(name for name, a in ALGORITHMS.items() if a.conditional)
# Sections whose leaves a search may vary; model identity, data location and serving stay fixed in a search.
SEARCHABLE_SECTIONS = ("train", "finetune", "deepspeed", "data", "scaling", "multitask")
# What PBT/PB2 may change in a running trial: an exploiting trial loads the donor's DeepSpeed checkpoint, so only
# keys that leave parameter shapes, shards and data intact can differ from the donor's.
PERTURBABLE_KEYS = (
    "train.lr",
    "train.weight_decay",
    "train.warmup_ratio",
    "train.grad_clip",
    "train.batch_size",
    "train.grad_accum",
    "finetune.lora.alpha",
    "finetune.lora.dropout",
    "finetune.dropout",
    "finetune.layerwise_lr_decay",
    "finetune.l1",
    "finetune.ewc.lambda",
    "multitask.primary_loss_weight",
    "multitask.temperature",
)


def schema_leaf(path: str) -> str | None:
    """Return None when `path` names a settable leaf of the schema, else why it does not."""
    parts = path.split(".")
    model: type[BaseModel] = ExperimentConfig
    for i, part in enumerate(parts):
        fields = dict(model.model_fields)
        fields.update({f.alias: f for f in model.model_fields.values() if f.alias})
        if part not in fields:
            where = ".".join(parts[:i]) or "top level"
            return f"'{part}' is not a key of {where} (known: {', '.join(sorted(model.model_fields))})"
        models = nested_models(fields[part].annotation)
        sub = models[0] if models else None
        if i == len(parts) - 1:
            return f"'{path}' is a section, not a single value" if sub else None
        if sub is None:
            return f"'{'.'.join(parts[: i + 1])}' is a value, it has no key '{parts[i + 1]}'"
        model = sub
    return None


def consistency_errors(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """Every cross-field contradiction as (dotted path, message)."""
    errors: list[tuple[str, str]] = []
    data, tune = cfg.data, cfg.tune
    classification = cfg.model.task == "sequence-classification"

    if classification and not data.columns.label:
        errors.append(("data.columns.label", "sequence-classification needs a label column"))
    task = cfg.model.task
    if not classification:
        if data.curation.balance != "none":
            errors.append(("data.curation.balance", f"class balancing needs labels; {task} has none"))
        if data.split.strategy == "stratified":
            errors.append(("data.split.strategy", f"stratified splitting needs labels; {task} has none"))
        if data.labels is not None:
            errors.append(("data.labels", f"{task} has no labels"))
    if task == "chat" and data.format == "text":
        errors.append(("data.format", "plain text holds no conversations; chat reads jsonl, parquet, csv or tsv"))
    if task != "chat" and data.chat.packing:
        errors.append(("data.chat.packing", f"packs conversations of model.task chat, not {task}"))
    if cfg.finetune.lora.export == "adapter" and cfg.finetune.method != "lora":
        errors.append(
            ("finetune.lora.export", f"an adapter export needs finetune.method lora, not {cfg.finetune.method}")
        )
    if cfg.finetune.lora.export == "adapter" and cfg.tasks:
        errors.append(("finetune.lora.export", "a multi-task export holds the extra heads beside a merged model"))

    if cfg.train.whole_repeats > 1:
        if not classification:
            errors.append(("train.whole_repeats", f"repeats whole rows of a classifier; {task} does not have them"))
        elif not data.split.overlap.containment:
            errors.append(("train.whole_repeats", "needs data.split.overlap.containment: true, which marks whole rows"))

    if cfg.deepspeed.precision in ("bf16", "fp16") and not cfg.scaling.use_gpu:
        errors.append(
            ("deepspeed.precision", f"{cfg.deepspeed.precision} needs scaling.use_gpu: true; CPU trains in fp32")
        )

    if cfg.model.attn_implementation == "flash_attention_2" and not cfg.scaling.use_gpu:
        errors.append(("model.attn_implementation", "flash_attention_2 runs on CUDA GPUs: needs scaling.use_gpu: true"))

    if cfg.finetune.gradual_unfreeze is not None and cfg.finetune.method == "lora":
        errors.append(("finetune.gradual_unfreeze", "gradual unfreezing works with method full or partial"))

    if cfg.deepspeed.zero_stage == 3:
        # Both penalties read every trainable weight outside the forward pass, where ZeRO-3 holds only shards.
        if cfg.finetune.ewc is not None:
            errors.append(("finetune.ewc", "elastic weight consolidation needs deepspeed.zero_stage 0, 1 or 2"))
        if cfg.finetune.l1:
            errors.append(("finetune.l1", "the L1 penalty needs deepspeed.zero_stage 0, 1 or 2"))

    needs_validation = []
    if cfg.train.early_stopping is not None:
        needs_validation.append("train.early_stopping")
    if tune is not None:
        needs_validation.append("tune")
    if needs_validation and data.split.validation == 0:
        errors.append(("data.split.validation", f"must be > 0 because {' and '.join(needs_validation)} is set"))

    if tune is not None:
        errors.extend(_tune_errors(cfg))
        if tune.max_forgetting is not None and cfg.train.retain_path is None:
            errors.append(("tune.max_forgetting", "needs train.retain_path: the retain set it measures forgetting on"))
    errors.extend(_task_errors(cfg))
    errors.extend(_promote_errors(cfg))
    errors.extend(deepspeed_override_errors(cfg))
    return errors


def _task_errors(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """Extra tasks: distinct names, a head the backbone can carry, labels where a classifier needs them."""
    errors: list[tuple[str, str]] = []
    if not cfg.tasks:
        return errors
    names = [cfg.multitask.primary]
    for i, task in enumerate(cfg.tasks):
        where = f"tasks[{i}]"
        if task.name in names:
            errors.append(
                (
                    f"{where}.name",
                    f"'{task.name}' is already a task name (the experiment's own task is "
                    f"multitask.primary '{cfg.multitask.primary}')",
                )
            )
        names.append(task.name)
        if task.task == "chat":
            errors.append((f"{where}.task", "chat is the experiment's own task (model.task), not an extra one"))
        if task.task == "causal-lm" and cfg.model.task not in CAUSAL_TASKS:
            errors.append(
                (
                    f"{where}.task",
                    "a causal-lm task needs the LM head of a causal-lm model: set model.task: "
                    "causal-lm and make the classification tasks the extra ones",
                )
            )
        if task.task == "sequence-classification" and not task.data.columns.label:
            errors.append((f"{where}.data.columns.label", "sequence-classification needs a label column"))
    if cfg.train.max_steps is None:
        errors.append(("train.max_steps", "a multi-task run counts steps over all tasks: set train.max_steps"))
    if cfg.finetune.ewc is not None:
        errors.append(("finetune.ewc", "elastic weight consolidation is not combined with extra tasks"))
    return errors


def _promote_errors(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    promote, classification = cfg.promote, cfg.model.task == "sequence-classification"
    errors = []
    for key in ("min_test_accuracy", "min_test_f1", "min_worst_slice_f1"):
        if getattr(promote, key) is not None and not classification:
            errors.append((f"promote.{key}", "is a classification threshold; causal-lm has no labels"))
    if promote.max_test_perplexity is not None and classification:
        errors.append(("promote.max_test_perplexity", "is a causal-lm threshold; use min_test_accuracy/min_test_f1"))
    if promote.min_worst_slice_f1 is not None and cfg.data.columns.slice is None:
        errors.append(("promote.min_worst_slice_f1", "needs data.columns.slice: the column that defines the slices"))
    if promote.max_p95_latency_ms is not None and promote.latency_concurrency not in cfg.bench.concurrency:
        errors.append(
            (
                "promote.latency_concurrency",
                f"must be one of bench.concurrency {cfg.bench.concurrency}, got {promote.latency_concurrency}",
            )
        )
    return errors


def _condition_errors(tune: TuneConfig) -> list[tuple[str, str]]:
    """`when` names keys of the search space that are always sampled, with values they can take."""
    errors: list[tuple[str, str]] = []
    for key, dim in tune.search_space.items():
        when = getattr(dim, "when", None)
        if not when:
            continue
        where = f"tune.search_space.{key}.when"
        if tune.algorithm not in CONDITIONAL_ALGORITHMS:
            errors.append(
                (where, f"conditional keys need algorithm {' or '.join(CONDITIONAL_ALGORITHMS)}, got {tune.algorithm}")
            )
        for other, value in when.items():
            parent = tune.search_space.get(other)
            if parent is None:
                errors.append((where, f"'{other}' is not a key of tune.search_space"))
            elif getattr(parent, "when", None):
                errors.append((where, f"'{other}' is itself conditional; conditions may only name unconditional keys"))
            elif isinstance(parent, (ChoiceDim, GridDim)) and value not in parent.values:
                errors.append((where, f"'{other}' takes {parent.values}, never {value!r}"))
    return errors


def _tune_errors(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    tune = cfg.tune
    assert tune is not None
    errors: list[tuple[str, str]] = []
    algorithm = ALGORITHMS[tune.algorithm]
    for key, dim in tune.search_space.items():
        where = f"tune.search_space.{key}"
        if key.split(".")[0] not in SEARCHABLE_SECTIONS:
            errors.append((where, f"only keys under {', '.join(SEARCHABLE_SECTIONS)} can be searched"))
            continue
        problem = schema_leaf(key)
        if problem:
            errors.append((where, problem))
        if tune.algorithm == "grid" and not isinstance(dim, GridDim):
            errors.append((where, f"algorithm 'grid' needs type 'grid', got '{dim.type}'"))
        if algorithm.continuous_only and not isinstance(dim, (UniformDim, LogUniformDim, IntDim)):
            errors.append((where, f"{tune.algorithm} models continuous ranges; type '{dim.type}' is not supported"))
        if algorithm.perturbs and key not in PERTURBABLE_KEYS:
            errors.append(
                (
                    where,
                    f"{tune.algorithm} changes hyper-parameters of running trials that restore each other's "
                    f"checkpoints, and '{key}' would not fit the donor's checkpoint; perturbable keys: "
                    f"{', '.join(PERTURBABLE_KEYS)} (search '{key}' with "
                    f"{', '.join(n for n, a in ALGORITHMS.items() if not a.perturbs)})",
                )
            )
    errors += _condition_errors(tune)
    if algorithm.perturbs:
        if tune.perturbation_interval is None:
            errors.append(("tune.perturbation_interval", f"{tune.algorithm} needs a perturbation interval"))
        if not tune.search_space:
            errors.append(("tune.search_space", f"{tune.algorithm} needs at least one key to perturb"))
    if algorithm.perturbs and tune.scheduler != "none":
        errors.append(("tune.scheduler", f"{tune.algorithm} is itself the scheduler: set scheduler: none"))
    if algorithm.scheduler and tune.scheduler != algorithm.scheduler:
        errors.append(
            (
                "tune.scheduler",
                f"{tune.algorithm} runs with its own {SCHEDULER_TITLES[algorithm.scheduler]} scheduler: set scheduler: "
                f"{algorithm.scheduler}",
            )
        )
    return errors


# Keys of the DeepSpeed JSON that the typed settings own: the loop plans batches, builds the model (ZeRO-3:
# partitioned at construction) and gathers checkpoints from them, so an override that disagrees would break those.
OWNED_DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.batch_size × scaling.num_workers × train.grad_accum",
}


def deepspeed_override_errors(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """`deepspeed.overrides` that contradict the typed settings or ask DeepSpeed for what its stage cannot do."""
    ds = cfg.deepspeed
    errors: list[tuple[str, str]] = []
    where = "deepspeed.overrides"
    for key, owner in OWNED_DEEPSPEED_KEYS.items():
        if key in ds.overrides:
            errors.append((f"{where}.{key}", f"is set from {owner}; set that instead of overriding it"))
    zero = ds.overrides.get("zero_optimization")
    if not isinstance(zero, dict):
        return errors
    stage = ds.zero_stage
    if "stage" in zero and zero["stage"] != stage:
        errors.append(
            (
                f"{where}.zero_optimization.stage",
                f"{zero['stage']!r} contradicts deepspeed.zero_stage {stage}; set deepspeed.zero_stage instead "
                "(the model build, checkpoint gathering and the ZeRO checks follow it)",
            )
        )
    param = zero.get("offload_param")
    if isinstance(param, dict) and param.get("device", "none") not in (None, "none") and stage != 3:
        errors.append(
            (
                f"{where}.zero_optimization.offload_param",
                f"parameter offload needs ZeRO stage 3 (only ZeRO-3 partitions parameters), got deepspeed.zero_stage "
                f"{stage}; use deepspeed.offload_params with zero_stage: 3",
            )
        )
    optimizer = zero.get("offload_optimizer")
    if isinstance(optimizer, dict) and optimizer.get("device", "none") not in (None, "none"):
        if stage == 0:
            errors.append(
                (
                    f"{where}.zero_optimization.offload_optimizer",
                    "optimizer offload needs deepspeed.zero_stage 1, 2 or 3, got 0",
                )
            )
        ratio = optimizer.get("ratio", 1.0)
        if isinstance(ratio, (int, float)) and ratio < 1 and stage != 3:
            errors.append(
                (
                    f"{where}.zero_optimization.offload_optimizer.ratio",
                    f"partial optimizer offload (ratio {ratio:g}) needs deepspeed.zero_stage 3, got {stage}",
                )
            )
    return errors


def _largest(cfg: ExperimentConfig, key: str, value: float) -> tuple[float, str]:
    """The largest value `key` can take in a run or any trial of the search, and the field that asks for it."""
    largest, field = value, key
    dim = cfg.tune.search_space.get(key) if cfg.tune is not None else None
    if isinstance(dim, (ChoiceDim, GridDim)):
        numbers = [v for v in dim.values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        candidate = max(numbers, default=value)
    elif isinstance(dim, (UniformDim, LogUniformDim, IntDim)):
        candidate = dim.high
    else:
        candidate = value
    if candidate > largest:
        largest, field = candidate, f"tune.search_space.{key}"
    return largest, field


def embedded_ray_errors(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """Workers that the embedded Ray (no cluster.address) can never place: it has this machine's CPUs and GPUs, and
    Ray Train would wait for them forever. A cluster joined by address may autoscale, so it is not checked."""
    if cfg.cluster.address is not None:
        return []
    scaling = cfg.scaling
    errors: list[tuple[str, str]] = []
    workers, workers_field = _largest(cfg, "scaling.num_workers", scaling.num_workers)
    cpus, cpus_field = _largest(cfg, "scaling.cpus_per_worker", scaling.cpus_per_worker)
    have_cpus = os.cpu_count() or 1
    if workers * cpus > have_cpus:
        field = cpus_field if cpus_field.startswith("tune.") else workers_field
        errors.append(
            (
                field,
                f"{workers:g} worker(s) × {cpus:g} CPU(s) (scaling.num_workers × scaling.cpus_per_worker) need "
                f"{workers * cpus:g} CPUs, but the embedded Ray on this machine has {have_cpus}; use fewer workers, "
                "or set cluster.address to run on a cluster",
            )
        )
    if scaling.use_gpu:
        import torch

        have_gpus = torch.cuda.device_count()
        per_worker, per_worker_field = _largest(cfg, "scaling.gpus_per_worker", scaling.gpus_per_worker or 1.0)
        if workers * per_worker > have_gpus:
            field = per_worker_field if per_worker_field.startswith("tune.") else workers_field
            errors.append(
                (
                    field,
                    f"{workers:g} worker(s) × {per_worker:g} GPU(s) (scaling.use_gpu) need {workers * per_worker:g} "
                    f"GPUs, but the embedded Ray on this machine has {have_gpus}; set cluster.address to run on a "
                    "cluster with GPUs",
                )
            )
    return errors


# Module types peft can wrap with a LoRA adapter (by class name, so transformers' GPT-2 Conv1D counts).
LORA_WRAPPABLE = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention", "Conv1D")


def lora_target_errors(cfg: ExperimentConfig, model_dir: str | None) -> list[tuple[str, str]]:
    """LoRA target modules the model does not have, checked on a local model directory (`model_dir`) by building
    the model from its config.json on the meta device (no weights read, no memory used). Hub ids are not checked
    (that would need the network); neither is remote code, which would run here."""
    lora = cfg.finetune.lora
    if cfg.finetune.method != "lora" or lora.target_modules == "auto" or model_dir is None:
        return []
    if cfg.model.trust_remote_code:
        return []
    modules = _meta_modules(model_dir, cfg.model.task)
    if modules is None:
        return []  # not a config this transformers can build; building the model for training will say why
    model_name, named = modules
    # in model order, linear layers first: those are what LoRA is usually put on
    wrappable = [(kind not in ("Linear", "Conv1D"), name) for name, kind in named if kind in LORA_WRAPPABLE]
    leaves = list(dict.fromkeys(name.rsplit(".", 1)[-1] for _, name in sorted(wrappable, key=lambda w: w[0])))
    field = "finetune.lora.target_modules"
    missing, unwrappable = [], []
    for target in lora.target_modules:
        kinds = {kind for name, kind in named if name == target or name.endswith(f".{target}")}
        if not kinds:
            missing.append(target)
        elif not kinds & set(LORA_WRAPPABLE):
            unwrappable.append(f"{target} ({', '.join(sorted(kinds))})")
    shown = ", ".join(leaves[:10]) + (", ..." if len(leaves) > 10 else "")
    errors = []
    if missing:
        errors.append((field, f"{model_name} has no module named {', '.join(missing)}; modules LoRA can wrap: {shown}"))
    if unwrappable:
        errors.append(
            (
                field,
                f"{', '.join(unwrappable)} in {model_name} cannot take a LoRA adapter; modules LoRA can wrap: {shown}",
            )
        )
    return errors


def _meta_modules(model_dir: str, task: str) -> tuple[str, list[tuple[str, str]]] | None:
    """(model class, [(module name, module class name), ...]) of the model the task builds, or None."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            config = AutoConfig.from_pretrained(model_dir)
            auto = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM
            with torch.device("meta"):
                net = auto.from_config(config)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception:  # any config transformers cannot build here: leave it to the training run's own error
        return None
    return type(net).__name__, [(name, type(module).__name__) for name, module in net.named_modules() if name]
