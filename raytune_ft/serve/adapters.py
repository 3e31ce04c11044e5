"""Many LoRA adapters on one base model in one process: requests for different adapters share a batch.

`adapter_exports` reads adapter-only exports (`finetune.lora.export: adapter`) and refuses what one shared base
cannot serve: merged exports, LoRA variants other than plain LoRA, adapters of another base model. `AdapterHost`
loads the base once and wraps each LoRA target module of its backbone in a `MultiLoraLinear`, which adds every
row's own adapter to the base module's output:

    out[i] = base(x)[i] + scale_a * (x[i] @ A_a^T @ B_a^T)     a = the adapter of row i (none: the base alone)

with scale = alpha / r (alpha / sqrt(r) for rsLoRA), what peft computes before merging. Rows that share an adapter
are computed together; a batch of one adapter needs no gather. Which adapter each row uses is per thread
(`AdapterHost.select`), so a generation thread and a classification thread drive the one model at once.

A classification adapter gets its own `ForSequenceClassification` shell built on the meta device (no weights
allocated), whose backbone is the shared backbone module and whose head holds the adapter's saved head weights
(peft's modules_to_save): the same model `load_exported_model` builds by merging, computed unmerged.

`unload` of an adapter that a forward in progress uses (in any thread) is deferred until the last such forward
ends: a hook on the backbone counts, per forward, the adapters its rows hold. A forward whose adapter was freed
between its `select` and its start raises AdapterError.

Two exports share a base when their recorded references are equal, or resolve to one directory, or to two
directories with the same config.json (less settings that do not change the computation: architectures, dtype,
labels, ...) and the same weights files (names, sizes, and bytes sampled at the start, middle and end of each).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raytune_ft.config.schema import CAUSAL_TASKS
from raytune_ft.errors import RaytuneFtError
from raytune_ft.export import ADAPTER_CONFIG
from raytune_ft.layout import METADATA
from raytune_ft.serve.model import ExportError, by_key, find_export, predictions

ADAPTER_WEIGHTS = "adapter_model.safetensors"
CLASSIFICATION = "sequence-classification"
PEFT_PREFIX = "base_model.model."  # what peft's saved keys start with
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"

# adapter_config.json keys that plain LoRA inference does not depend on (or that are checked on their own)
_HARMLESS = {
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "fan_in_fan_out",  # Conv1D layers: A and B are stored as for nn.Linear all the same
    "use_rslora",
    "modules_to_save",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "runtime_config",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "peft_type",
    "auto_mapping",
    "inference_mode",
    "peft_version",
    "bias",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "ensure_weight_tying",
}
# initialisations that change the base weights (so the adapter is only right on that changed base) or that make
# a variant of LoRA
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "mica")
_NAMED = {
    "use_dora": "DoRA (use_dora)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "lora_bias": "a bias on LoRA B (lora_bias)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}
# config.json keys that do not change what the weights compute
_CONFIG_IGNORED = {
    "architectures",
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "finetuning_task",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "use_cache",
    "auto_map",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "classifier_dropout",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SAMPLE = 1 << 20  # bytes read at the start, middle and end of each weights file to tell two bases apart


class AdapterError(RaytuneFtError, ValueError):
    """A request names an adapter the host does not hold (or not loaded), or one of the wrong task."""


@dataclass(frozen=True)
class AdapterExport:
    id: str  # what clients send as `model`: the experiment's name; a clash gets "-2", "-3" in the given order
    path: Path  # the export directory
    task: str
    base_model: str  # provenance.base_model as recorded
    labels: list[str]  # a classifier's label names (label_names or classes), [] for causal
    chat: bool  # its tokenizer carries a chat template
    meta: dict

    @property
    def max_length(self) -> int:
        return int((self.meta.get("experiment") or {}).get("data", {}).get("max_length") or 512)


# --- reading and checking exports


def adapter_exports(paths: list[Path]) -> list[AdapterExport]:
    """The adapter-only exports at PATHS (each an export, a run directory holding one, or a folder of those: its
    direct children holding one, sorted), all of one base model: the first export's. ExportError otherwise."""
    dirs: list[Path] = []
    for path in paths:
        for found in _expand(Path(path)):
            if found.resolve() not in {d.resolve() for d in dirs}:
                dirs.append(found)
    if not dirs:
        raise ExportError("no adapter exports given: pass at least one adapter-only export")
    exports: list[AdapterExport] = []
    taken: set[str] = set()
    for export_dir in dirs:
        meta = _read_meta(export_dir)
        name = str((meta.get("experiment") or {}).get("name") or export_dir.name)
        ident, n = name, 1
        while ident in taken:
            n += 1
            ident = f"{name}-{n}"
        taken.add(ident)
        exports.append(_check_export(export_dir, meta, ident))
    check_bases(exports)
    return exports


def check_bases(exports: list[AdapterExport]) -> None:
    """ExportError unless every export's base model is the first one's (see _base_difference)."""
    if not exports:
        return
    first = exports[0]
    for export in exports[1:]:
        why = _base_difference(export.base_model, first.base_model)
        if why is not None:
            raise ExportError(
                f"{export.path}: its base model is {export.base_model}, the deployment's base is "
                f"{first.base_model} (from {first.path}); {why}"
            )


def _expand(path: Path) -> list[Path]:
    try:
        return [find_export(path)]
    except ExportError:
        if not path.is_dir():
            raise
    found = []
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        try:
            found.append(find_export(child))
        except ExportError:
            continue
    if not found:
        raise ExportError(
            f"{path}: no {METADATA} here, in its winner/ or export/, nor in any folder directly inside it; pass "
            "exports, run directories, or a folder of them"
        )
    return found


def _read_meta(export_dir: Path) -> dict[str, Any]:
    try:
        meta = json.loads((export_dir / METADATA).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{export_dir}: cannot read {METADATA}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ExportError(f"{export_dir}: {METADATA} is not a JSON object")
    return meta


def _check_export(export_dir: Path, meta: dict[str, Any], ident: str) -> AdapterExport:
    from transformers import AutoTokenizer

    if not meta.get("adapter_only"):
        raise ExportError(f"{export_dir}: a merged export; serve it alone or export with finetune.lora.export: adapter")
    task = meta.get("task")
    if task != CLASSIFICATION and task not in CAUSAL_TASKS:
        raise ExportError(f"{export_dir}: task {task!r} cannot be served as an adapter")
    base = (meta.get("provenance") or {}).get("base_model")
    if not base:
        raise ExportError(f"{export_dir}: an adapter-only export whose {METADATA} names no base model")
    config = _adapter_config(export_dir)
    _check_lora_config(export_dir, config, task)
    _check_lora_weights(export_dir, task)
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    vocab = _base_config(str(base)).get("vocab_size")
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ExportError(
            f"{export_dir}: its tokenizer has {len(tokenizer)} tokens, the base model {base} {vocab}: training "
            "added tokens, so the adapter needs its own embeddings; serve it alone"
        )
    labels = [str(n) for n in (meta.get("label_names") or meta.get("classes") or [])] if task == CLASSIFICATION else []
    return AdapterExport(
        id=ident,
        path=export_dir,
        task=str(task),
        base_model=str(base),
        labels=labels,
        chat=bool(getattr(tokenizer, "chat_template", None)),
        meta=meta,
    )


def _adapter_config(export_dir: Path) -> dict[str, Any]:
    path = export_dir / ADAPTER_CONFIG
    if not path.is_file() or not (export_dir / ADAPTER_WEIGHTS).is_file():
        raise ExportError(
            f"{export_dir}: adapter_only, but {ADAPTER_CONFIG} or {ADAPTER_WEIGHTS} is missing; export it again"
        )
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ExportError(f"{path}: not JSON: {exc}") from exc
    return config


def _lora_defaults() -> dict[str, Any]:
    try:
        import dataclasses

        from peft import LoraConfig
    except ImportError:  # pragma: no cover - peft is what wrote the adapters
        return {}
    out = {}
    for f in dataclasses.fields(LoraConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    return out


def _check_lora_config(export_dir: Path, config: dict[str, Any], task: str) -> None:
    problem = _lora_config_problem(config, task)
    if problem:
        raise ExportError(f"{export_dir}: {problem}; serve it alone (merged: finetune.lora.export: merged)")


def _lora_config_problem(config: dict[str, Any], task: str) -> str | None:
    if config.get("peft_type") != "LORA":
        return f"a {config.get('peft_type')} adapter, not LoRA"
    expected = "SEQ_CLS" if task == CLASSIFICATION else "CAUSAL_LM"
    if config.get("task_type") not in (expected, None):
        return f"its adapter_config.json says task_type {config.get('task_type')}, its task is {task}"
    if config.get("bias", "none") != "none":
        return f"it trains biases (bias: {config['bias']})"
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        return f"init_lora_weights {init!r} changes the base weights or makes a LoRA variant"
    defaults = _lora_defaults()
    for key, value in config.items():
        if key in _HARMLESS or not value or (key in defaults and value == defaults[key]):
            continue
        return f"{_NAMED.get(key, key)} is not supported (adapter_config.json: {key}={json.dumps(value)})"
    return None


def _check_lora_weights(export_dir: Path, task: str) -> None:
    from safetensors import safe_open

    with safe_open(str(export_dir / ADAPTER_WEIGHTS), "pt") as f:
        keys = list(f.keys())
        embedding = next((k for k in keys if ".lora_embedding_" in k), None)
        if embedding:
            raise ExportError(f"{export_dir}: LoRA on an embedding layer ({embedding}) is not supported")
        for key in keys:
            if key.endswith((LORA_A, LORA_B)):
                if key.removeprefix(PEFT_PREFIX).startswith("lm_head."):
                    raise ExportError(f"{export_dir}: LoRA on the output layer ({key}) is not supported")
                if len(f.get_slice(key).get_shape()) != 2:
                    raise ExportError(f"{export_dir}: LoRA on a convolution ({key}) is not supported")
                continue
            if task != CLASSIFICATION or "embed" in key or key.removeprefix(PEFT_PREFIX).startswith("lm_head"):
                raise ExportError(
                    f"{export_dir}: the adapter saved full weights ({key}): embedding layers because training "
                    "added tokens, or modules_to_save of a causal model; serve it alone"
                )


# --- comparing two bases


def _base_config(ref: str) -> dict[str, Any]:
    folder = _local_dir(ref)
    if folder is None:
        return {}
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _local_dir(ref: str) -> Path | None:
    from raytune_ft.model_source import ModelSourceError, resolve_model_source

    try:
        resolved = Path(resolve_model_source(ref, convert=False))
    except ModelSourceError:
        return None
    return resolved if (resolved / "config.json").is_file() else None


def _base_difference(ref: str, deployment: str) -> str | None:
    """None when REF and DEPLOYMENT name one model: the same reference, the same directory, or two directories with
    the same config.json (but for settings that do not change the weights' computation) and the same weights
    files (names, sizes, and bytes sampled at the start, middle and end of each); else why they differ."""
    if ref == deployment:
        return None
    a, b = _local_dir(ref), _local_dir(deployment)
    if a is None or b is None:
        return "the two references differ and are not both local model directories to compare"
    if os.path.realpath(a) == os.path.realpath(b):
        return None
    ca, cb = _base_config(ref), _base_config(deployment)
    keys = sorted((set(ca) | set(cb)) - _CONFIG_IGNORED)
    differ = [k for k in keys if ca.get(k) != cb.get(k)]
    if differ:
        shown = ", ".join(f"{k} ({ca.get(k)!r} vs {cb.get(k)!r})" for k in differ[:3])
        return f"their config.json differ in {shown}"
    if _weights_fingerprint(a) != _weights_fingerprint(b):
        return "the two directories hold different weights"
    return None


def _weights_fingerprint(folder: Path) -> list[tuple[str, int, str]]:
    out = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)):
        size = path.stat().st_size
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for start in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                f.seek(start)
                digest.update(f.read(_SAMPLE))
        out.append((path.name, size, digest.hexdigest()))
    return out


# --- the multi-adapter module


class _Selection(threading.local):
    """Per thread: the adapter of each row of the next forwards, grouped (adapter id, row indices or None for all
    rows), and the adapters the forwards in progress hold (a stack: forwards may nest)."""

    def __init__(self) -> None:
        self.rows: list[str | None] | None = None
        self.groups: list[tuple[str, torch.Tensor | None]] = []
        self.held: list[list[str]] = []


class MultiLoraLinear(nn.Module):
    """A Linear (or transformers' Conv1D) with any number of LoRA adapters beside it; each row of a batch gets its
    own (the host's per-thread selection), or none."""

    def __init__(self, base: nn.Module, selection: _Selection) -> None:
        super().__init__()
        self.base = base
        self.lora_A: dict[str, torch.Tensor] = {}
        self.lora_B: dict[str, torch.Tensor] = {}
        self.scaling: dict[str, float] = {}
        self._selection = selection

    def __getattr__(self, name: str) -> Any:
        # code that reads the wrapped layer's attributes (weight, in_features, ...) finds the base layer's
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self._modules["base"], name)

    def add(self, adapter_id: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        self.lora_A[adapter_id], self.lora_B[adapter_id], self.scaling[adapter_id] = a, b, scale

    def remove(self, adapter_id: str) -> None:
        for store in (self.lora_A, self.lora_B, self.scaling):
            store.pop(adapter_id, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        selection = self._selection
        if not selection.groups:
            return out
        if selection.rows is not None and x.shape[0] != len(selection.rows):
            raise RuntimeError(
                f"AdapterHost.select gave {len(selection.rows)} rows, but this forward has a batch of {x.shape[0]}"
            )
        for adapter_id, rows in selection.groups:
            a = self.lora_A.get(adapter_id)
            if a is None:  # this adapter does not adapt this module
                continue
            b, scale = self.lora_B[adapter_id], self.scaling[adapter_id]
            if rows is None:
                out = out.add_(nn.functional.linear(nn.functional.linear(x, a), b), alpha=scale)
            else:
                delta = nn.functional.linear(nn.functional.linear(x.index_select(0, rows), a), b)
                out = out.index_add_(0, rows, delta, alpha=scale)
        return out


# --- the host


@dataclass
class _Installed:
    modules: list[str]  # backbone-relative names of the wrapped modules it adapts
    shell: nn.Module | None  # a classifier's ForSequenceClassification on the shared backbone


class AdapterHost:
    """One base model, many LoRA adapters (see the module's docstring)."""

    def __init__(
        self,
        exports: list[AdapterExport],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        preload: bool = True,
    ) -> None:
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        from raytune_ft.model_source import resolve_model_source

        if not exports:
            raise ExportError("no adapter exports given: pass at least one adapter-only export")
        self.exports: dict[str, AdapterExport] = {e.id: e for e in exports}
        if len(self.exports) != len(exports):
            raise ExportError(f"adapter ids are not unique: {[e.id for e in exports]}; use adapter_exports")
        check_bases(exports)
        self.device = torch.device(device)
        self.dtype = dtype
        self.base_model = exports[0].base_model
        self._source = resolve_model_source(self.base_model)
        causal = any(e.task in CAUSAL_TASKS for e in exports)
        auto = AutoModelForCausalLM if causal else AutoModel
        model = auto.from_pretrained(self._source, dtype=dtype).to(self.device).eval()
        model.requires_grad_(False)
        self.causal_lm: nn.Module | None = model if causal else None
        prefix = model.base_model_prefix
        self.backbone: nn.Module = getattr(model, prefix) if causal and hasattr(model, prefix) else model
        self._selection = _Selection()
        self._lock = threading.RLock()
        self._installed: dict[str, _Installed] = {}
        self._pending_unload: set[str] = set()
        self._in_use: Counter[str] = Counter()
        self._tokenizers: dict[str, Any] = {}
        self._prefixes: dict[bool, str] = {}
        for export in exports:
            tokenizer = AutoTokenizer.from_pretrained(str(export.path))
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            self._tokenizers[export.id] = tokenizer
        self._targets = {e.id: self._targets_of(e) for e in exports}
        self.modules: dict[str, MultiLoraLinear] = {}
        for name in sorted({n for names in self._targets.values() for n in names}):
            self.modules[name] = self._wrap(name)
        self.backbone.register_forward_pre_hook(self._hold)
        self.backbone.register_forward_hook(self._release, always_call=True)
        if preload:
            for export in exports:
                self.load(export.id)

    # -- structure

    def _backbone_prefix(self, export: AdapterExport) -> str:
        """The backbone's name inside the model class the export was trained as (its saved keys start with it)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        classification = export.task == CLASSIFICATION
        if classification not in self._prefixes:
            auto = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
            config = AutoConfig.from_pretrained(self._source)
            self._prefixes[classification] = auto._model_mapping[type(config)].base_model_prefix
        return self._prefixes[classification]

    def _targets_of(self, export: AdapterExport) -> list[str]:
        """The backbone-relative names of the modules EXPORT's LoRA adapts; ExportError for one outside the
        backbone or of a type this host does not wrap."""
        from safetensors import safe_open
        from transformers.pytorch_utils import Conv1D

        prefix = self._backbone_prefix(export) + "."
        names = []
        with safe_open(str(export.path / ADAPTER_WEIGHTS), "pt") as f:
            keys = list(f.keys())
        for key in keys:
            if not key.endswith(LORA_A):
                continue
            name = key.removeprefix(PEFT_PREFIX).removesuffix(LORA_A)
            if not name.startswith(prefix):
                raise ExportError(f"{export.path}: LoRA on {name}, outside the base model's backbone, is not supported")
            name = name.removeprefix(prefix)
            try:
                module = self.backbone.get_submodule(name)
            except AttributeError as exc:
                raise ExportError(f"{export.path}: LoRA on {name}, which the base model has not") from exc
            if isinstance(module, MultiLoraLinear):
                module = module.base
            if not isinstance(module, (nn.Linear, Conv1D)):
                raise ExportError(
                    f"{export.path}: LoRA on {name}, a {type(module).__name__}; only Linear layers are supported"
                )
            names.append(name)
        return names

    def _wrap(self, name: str) -> MultiLoraLinear:
        parent_name, _, child = name.rpartition(".")
        parent = self.backbone.get_submodule(parent_name) if parent_name else self.backbone
        wrapped = MultiLoraLinear(getattr(parent, child), self._selection)
        setattr(parent, child, wrapped)
        return wrapped

    # -- loading

    def load(self, adapter_id: str) -> None:
        """Install ADAPTER_ID's LoRA weights (and a classifier's head); nothing when it is loaded."""
        from safetensors.torch import load_file

        export = self._export(adapter_id)
        with self._lock:
            if adapter_id in self._installed:
                self._pending_unload.discard(adapter_id)  # an unload waiting for a forward to end is called off
                return
            config = json.loads((export.path / ADAPTER_CONFIG).read_text())
            r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
            state = load_file(str(export.path / ADAPTER_WEIGHTS))
            prefix = self._backbone_prefix(export) + "."
            names = self._targets[adapter_id]
            weights = {}
            for name in names:
                key = f"{PEFT_PREFIX}{prefix}{name}"
                a, b = state.pop(key + LORA_A), state.pop(key + LORA_B)
                if a.shape[0] != r or b.shape[1] != r:
                    raise ExportError(
                        f"{export.path}: LoRA on {name} has rank {a.shape[0]}, adapter_config.json says r={r}"
                    )
                weights[name] = (a.to(self.device, self.dtype), b.to(self.device, self.dtype))
            # what is left: a classifier's head (peft's modules_to_save); never weights of the shared backbone
            heads = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
            alien = [k for k in heads if k.startswith(prefix) or export.task != CLASSIFICATION]
            if alien:
                raise ExportError(f"{export.path}: the adapter saved full weights ({alien[0]}); serve it alone")
            shell = self._shell(export, heads) if export.task == CLASSIFICATION else None
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            for name, (a, b) in weights.items():
                self.modules[name].add(adapter_id, a, b, scale)
            self._installed[adapter_id] = _Installed(names, shell)

    def _shell(self, export: AdapterExport, heads: dict[str, torch.Tensor]) -> nn.Module:
        """EXPORT's classifier: a ForSequenceClassification built on the meta device, whose backbone is the shared
        one and whose head is the adapter's, with the config load_exported_model gives it (num_labels)."""
        from transformers import AutoConfig, AutoModelForSequenceClassification

        options = {"num_labels": len(export.labels)} if export.labels else {}
        config = AutoConfig.from_pretrained(self._source, **options)
        with torch.device("meta"):
            shell = AutoModelForSequenceClassification.from_config(config)
        prefix = shell.base_model_prefix
        if type(getattr(shell, prefix)) is not type(self.backbone):
            raise ExportError(
                f"{export.path}: its classifier's backbone is a {type(getattr(shell, prefix)).__name__}, the "
                f"shared one a {type(self.backbone).__name__}"
            )
        setattr(shell, prefix, self.backbone)
        heads = {k: v.to(self.device, self.dtype) for k, v in heads.items()}
        try:
            shell.load_state_dict(heads, strict=False, assign=True)
        except RuntimeError as exc:
            raise ExportError(f"{export.path}: its classification head does not fit: {exc}") from exc
        left = [n for n, t in [*shell.named_parameters(), *shell.named_buffers()] if t.is_meta]
        if left:
            raise ExportError(f"{export.path}: the adapter holds no weights for {', '.join(left[:5])}")
        return shell.eval()

    def unload(self, adapter_id: str) -> None:
        """Free ADAPTER_ID's weights; while a forward in progress uses it, when the last such forward ends."""
        self._export(adapter_id)
        with self._lock:
            if adapter_id not in self._installed:
                return
            if self._in_use[adapter_id]:
                self._pending_unload.add(adapter_id)
            else:
                self._free(adapter_id)

    def _free(self, adapter_id: str) -> None:
        installed = self._installed.pop(adapter_id)
        self._pending_unload.discard(adapter_id)
        for name in installed.modules:
            self.modules[name].remove(adapter_id)

    def classifier(self, adapter_id: str) -> nn.Module:
        """ADAPTER_ID's ForSequenceClassification (on the shared backbone), as loaded."""
        export = self._export(adapter_id)
        installed = self._installed.get(adapter_id)
        if export.task != CLASSIFICATION:
            raise AdapterError(f"adapter '{adapter_id}' is a {export.task} model, not a classifier")
        if installed is None or installed.shell is None or adapter_id in self._pending_unload:
            raise AdapterError(f"adapter '{adapter_id}' is not loaded")
        return installed.shell

    def loaded(self) -> list[str]:
        """The adapters installed (not those waiting to be freed), in the exports' order."""
        with self._lock:
            return [i for i in self.exports if i in self._installed and i not in self._pending_unload]

    def _export(self, adapter_id: str) -> AdapterExport:
        export = self.exports.get(adapter_id)
        if export is None:
            raise AdapterError(f"unknown adapter '{adapter_id}'; this host serves: {', '.join(self.exports)}")
        return export

    # -- which adapter each row uses

    def select(self, rows: list[str | None]) -> None:
        """The adapter of each batch row of the next forwards in this thread (None: the base alone)."""
        with self._lock:
            for adapter_id in dict.fromkeys(r for r in rows if r is not None):
                self._export(adapter_id)
                if adapter_id not in self._installed or adapter_id in self._pending_unload:
                    raise AdapterError(f"adapter '{adapter_id}' is not loaded")
        rows = list(rows)
        if rows != self._selection.rows:  # a generation step selects the rows of the step before, mostly
            self._selection.rows, self._selection.groups = rows, self._group(rows)

    def _group(self, rows: list[str | None]) -> list[tuple[str, torch.Tensor | None]]:
        ids = list(dict.fromkeys(r for r in rows if r is not None))
        if len(ids) == 1 and all(r is not None for r in rows):
            return [(ids[0], None)]
        return [
            (i, torch.tensor([n for n, r in enumerate(rows) if r == i], dtype=torch.long, device=self.device))
            for i in ids
        ]

    def selected(self) -> list[str | None] | None:
        """This thread's selection (None before any select)."""
        return self._selection.rows

    def _hold(self, *_: Any) -> None:
        ids = [i for i, _ in self._selection.groups]
        self._selection.held.append([])  # popped by _release, which runs even when this raises
        with self._lock:
            gone = [i for i in ids if i not in self._installed]
            if gone:
                raise AdapterError(f"adapter '{gone[0]}' was unloaded after it was selected")
            self._in_use.update(ids)
        self._selection.held[-1] = ids

    def _release(self, *_: Any) -> None:
        if not self._selection.held:
            return
        ids = self._selection.held.pop()
        with self._lock:
            self._in_use.subtract(ids)
            for i in ids:
                if self._in_use[i] <= 0:
                    del self._in_use[i]
                    if i in self._pending_unload:
                        self._free(i)

    # -- per adapter

    def tokenizer(self, adapter_id: str) -> Any:
        """ADAPTER_ID's tokenizer (its export's, padding with EOS when it has no pad token)."""
        return self._tokenizers[self._export(adapter_id).id]

    @torch.inference_mode()
    def classify(self, adapter_id: str, texts: list[str]) -> list[dict[str, Any]]:
        """As LoadedModel.classify on that export: one forward over TEXTS, predictions in input order."""
        export = self._export(adapter_id)
        shell = self.classifier(adapter_id)
        if not texts:
            return []
        tokenizer = self._tokenizers[adapter_id]
        batch = tokenizer(texts, truncation=True, max_length=export.max_length, padding=True, return_tensors="pt")
        batch = batch.to(self.device)
        before = self._selection.rows, self._selection.groups
        self.select([adapter_id] * len(texts))
        try:
            logits = shell(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            self._selection.rows, self._selection.groups = before
        labels = export.labels or [str(i) for i in range(logits.shape[-1])]
        return predictions(logits, labels)

    def classify_items(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """(adapter_id, text) pairs from several requests: one forward per adapter, answers in input order."""
        return by_key(items, self.classify)
