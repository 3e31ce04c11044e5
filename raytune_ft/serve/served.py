"""What one replica serves, behind one interface for the routes: one export (`OneExport`), or several LoRA exports
on one base model (`ManyAdapters`). Either gives, per model id the API accepts, a `Target`: its task, tokenizer and
stop ids, and the key its rows carry through the generation engine and classification.

Generation goes through one GenerationEngine per replica (serve/engine.py), which batches every request in flight;
with several adapters the engine's rows name their adapter and the AdapterHost applies each row's LoRA weights
(serve/adapters.py), so requests for different adapters share forward passes.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytune_ft.config.schema import CAUSAL_TASKS, ServeConfig
from raytune_ft.serve.api import ApiError
from raytune_ft.serve.model import chat_prompt_ids, serving_stop_ids


@dataclass
class Target:
    id: str
    task: str
    tokenizer: Any
    key: str | None  # the engine row's adapter and the classification key (single export: None / the task)
    stop_ids: list[int]

    @property
    def generates(self) -> bool:
        return self.task in CAUSAL_TASKS

    @property
    def chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def model_context(model: Any) -> int | None:
    """The longest sequence the model's positions allow (prompt + answer), when its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def render_prompt(target: Target, messages: list[dict[str, str]] | None, prompt: str | None) -> list[int]:
    """The prompt's token ids: MESSAGES rendered with the model's chat template, or PROMPT as it is."""

    if messages is None:
        return list(target.tokenizer(prompt)["input_ids"])
    if not target.chat:
        raise ApiError(
            400,
            f"model '{target.id}' has no chat template ({target.task} export): send raw text to /v1/completions",
            "invalid_request",
            "messages",
        )
    return chat_prompt_ids(target.tokenizer, messages)


class OneExport:
    """One export, merged (an adapter-only export is merged into its base on load): the app of `serve EXPORT`."""

    multiplexed = False

    def __init__(self, export: Path, settings: ServeConfig, threads: int) -> None:
        from raytune_ft.serve.model import LoadedModel

        self.model = LoadedModel(export, num_threads=threads, dtype=settings.dtype)
        model, tokenizer = self.model.model, self.model.tokenizer
        self.target = Target(self.model.name, self.model.task, tokenizer, None, serving_stop_ids(tokenizer, model))
        self.engine = None
        self.context = model_context(model)
        if self.model.task in CAUSAL_TASKS:
            from raytune_ft.serve.engine import GenerationEngine

            self.engine = GenerationEngine(
                model,
                pad_id=tokenizer.pad_token_id,
                stop_ids=self.target.stop_ids,
                max_batch_size=settings.max_batch_size,
                max_context=self.context,
            )

    @property
    def name(self) -> str:
        return self.model.name

    def resolve(self, requested: str | None) -> Target:
        # one model: whatever the client names (OpenAI clients must send a `model`), this is it
        return self.target

    def models(self) -> list[dict[str, Any]]:
        info = self.model.info()
        info["experiment"] = self.model.meta.get("experiment", {}).get("name")
        return [info]

    def classify_items(self, items: list[tuple[str | None, str]]) -> list[dict[str, Any]]:
        return self.model.classify_items(items)

    def ready(self) -> bool:
        return self.model.model is not None

    async def acquire(self, target: Target, loader: Any) -> None:
        return None

    def release(self, target: Target) -> None:
        return None


class ManyAdapters:
    """LoRA exports of one base model: the base loaded once, each adapter's weights loaded on demand (Ray Serve's
    model multiplexing decides which, LRU; see acquire) and applied per batch row."""

    multiplexed = True

    def __init__(self, exports: list[Any], settings: ServeConfig, threads: int) -> None:
        import torch

        from raytune_ft.serve.adapters import AdapterHost
        from raytune_ft.serve.model import serving_dtype

        torch.set_num_threads(max(1, threads))
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        # adapters load on demand: Serve's multiplexing decides which a replica holds
        self.host = AdapterHost(exports, device=device, dtype=serving_dtype(settings.dtype, device), preload=False)
        self.exports = {e.id: e for e in exports}
        self.targets: dict[str, Target] = {}
        for e in exports:
            tokenizer = self.host.tokenizer(e.id)
            stops = serving_stop_ids(tokenizer, self.host.causal_lm) if e.task in CAUSAL_TASKS else []
            self.targets[e.id] = Target(e.id, e.task, tokenizer, e.id, stops)
        self.name = f"{len(exports)} adapters on {exports[0].base_model}"
        self.engine = None
        self.context = model_context(self.host.causal_lm) if self.host.causal_lm is not None else None
        if self.host.causal_lm is not None:
            from raytune_ft.serve.engine import GenerationEngine

            first = next(t for t in self.targets.values() if t.generates)
            self.engine = GenerationEngine(
                self.host.causal_lm,
                pad_id=first.tokenizer.pad_token_id,
                stop_ids=first.stop_ids,
                max_batch_size=settings.max_batch_size,
                max_context=self.context,
                rows_hook=self.host.select,
            )
        self.threads = torch.get_num_threads()
        # requests at work per adapter, and adapters Serve unloaded while some were: their weights stay until the
        # last of those requests ends. Serve unloads from an executor thread, hence the lock.
        self._lock = threading.Lock()
        self._working: Counter[str] = Counter()
        self._evicted: set[str] = set()

    def resolve(self, requested: str | None) -> Target:
        known = ", ".join(self.targets)
        if not requested:
            raise ApiError(
                400,
                f"name the adapter: the `model` field or the serve_multiplexed_model_id header (one of: {known})",
                "invalid_request",
                "model",
            )
        if requested not in self.targets:
            raise ApiError(
                404, f"the model '{requested}' does not exist here; served: {known}", "model_not_found", "model"
            )
        return self.targets[requested]

    def models(self) -> list[dict[str, Any]]:
        loaded = set(self.host.loaded())
        out = []
        for e in self.exports.values():
            checkpoint = e.meta.get("checkpoint", {})
            out.append(
                {
                    "id": e.id,
                    "object": "model",
                    "owned_by": "raytune_ft",
                    "task": e.task,
                    "adapter": True,
                    "loaded": e.id in loaded,
                    "labels": e.labels or None,
                    "base_model": e.base_model,
                    "checkpoint_step": checkpoint.get("step"),
                    "metrics": e.meta.get("metrics", {}),
                    "test_metrics": None,
                    "exported": e.meta.get("exported"),
                    "experiment": e.meta.get("experiment", {}).get("name"),
                    "export_dir": str(e.path),
                    "threads": self.threads,
                }
            )
        return out

    def classify_items(self, items: list[tuple[str | None, str]]) -> list[dict[str, Any]]:
        return self.host.classify_items(items)

    def ready(self) -> bool:
        return True

    def load(self, adapter: str) -> None:
        """The multiplexed loader's work (in a thread)."""
        with self._lock:
            self._evicted.discard(adapter)
            self.host.load(adapter)

    def evict(self, adapter: str) -> None:
        """Serve unloaded ADAPTER (LRU): free its weights now, or when its last request in flight ends."""
        with self._lock:
            if self._working[adapter]:
                self._evicted.add(adapter)
            else:
                self.host.unload(adapter)

    async def acquire(self, target: Target, loader: Any) -> None:
        await loader(target.id)  # Serve's multiplexed loader: loads it (unloading the LRU one), or marks it used
        with self._lock:
            self._working[target.id] += 1

    def release(self, target: Target) -> None:
        with self._lock:
            self._working[target.id] -= 1
            if not self._working[target.id] and target.id in self._evicted:
                self._evicted.discard(target.id)
                self.host.unload(target.id)


class Lease:
    """What Serve's multiplexed loader returns for an adapter: Serve calls `__del__` when it unloads it (LRU).
    Garbage collection calls it too, later; only the first call counts."""

    def __init__(self, owner: ManyAdapters, adapter: str) -> None:
        self.owner, self.adapter, self.live = owner, adapter, True

    def __del__(self) -> None:
        if self.live:
            self.live = False
            self.owner.evict(self.adapter)
