"""Rules that span several fields or sections, checked after each section is valid on its own."""

from __future__ import annotations

from pydantic import BaseModel

from raytune_ft.config.schema import (
    ChoiceDim,
    ExperimentConfig,
    GridDim,
    IntDim,
    LogUniformDim,
    TuneConfig,
    UniformDim,
    nested_models,
)

# Tune's variant generator resolves `sample_from` after plain domains; Optuna defines the space by running code.
CONDITIONAL_ALGORITHMS = ("random", "optuna")
# Sections whose leaves a search may vary; model identity, data location and serving stay fixed in a search.
SEARCHABLE_SECTIONS = ("train", "finetune", "deepspeed", "data", "scaling")
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
    if not classification:
        if data.curation.balance != "none":
            errors.append(("data.curation.balance", "class balancing needs labels; causal-lm has none"))
        if data.split.strategy == "stratified":
            errors.append(("data.split.strategy", "stratified splitting needs labels; causal-lm has none"))
        if data.labels is not None:
            errors.append(("data.labels", "causal-lm has no labels"))

    if cfg.deepspeed.precision in ("bf16", "fp16") and not cfg.scaling.use_gpu:
        errors.append(
            ("deepspeed.precision", f"{cfg.deepspeed.precision} needs scaling.use_gpu: true; CPU trains in fp32")
        )

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
    errors.extend(_promote_errors(cfg))
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
        if tune.algorithm == "pb2" and not isinstance(dim, (UniformDim, LogUniformDim, IntDim)):
            errors.append((where, f"pb2 models continuous ranges; type '{dim.type}' is not supported"))
        if tune.algorithm in ("pbt", "pb2") and key not in PERTURBABLE_KEYS:
            errors.append(
                (
                    where,
                    f"{tune.algorithm} changes hyper-parameters of running trials that restore each other's "
                    f"checkpoints, and '{key}' would not fit the donor's checkpoint; perturbable keys: "
                    f"{', '.join(PERTURBABLE_KEYS)} (search '{key}' with random, grid, optuna, hyperopt or bohb)",
                )
            )
    errors += _condition_errors(tune)
    if tune.algorithm in ("pbt", "pb2"):
        if tune.perturbation_interval is None:
            errors.append(("tune.perturbation_interval", f"{tune.algorithm} needs a perturbation interval"))
        if not tune.search_space:
            errors.append(("tune.search_space", f"{tune.algorithm} needs at least one key to perturb"))
    if tune.algorithm in ("pbt", "pb2") and tune.scheduler != "none":
        errors.append(("tune.scheduler", f"{tune.algorithm} is itself the scheduler: set scheduler: none"))
    if tune.algorithm == "bohb" and tune.scheduler != "hyperband":
        errors.append(("tune.scheduler", "bohb runs with its own HyperBand scheduler: set scheduler: hyperband"))
    return errors
