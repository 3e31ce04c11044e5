"""An exported model in memory: what a Serve replica holds and what `bench serve` times in-process (the floor).

It reads the export directory that `train` and `tune` write (safetensors, config, tokenizer, raytune_ft.json) with
the same `from_pretrained` calls a user would, and nothing else.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from raytune_ft.config.schema import CAUSAL_TASKS
from raytune_ft.errors import RaytuneFtError
from raytune_ft.export import METADATA
from raytune_ft.generation import stop_ids
from raytune_ft.layout import TEST_METRICS


class ExportError(RaytuneFtError, ValueError):
    """The directory is not a raytune_ft export (or a run directory holding one)."""


def find_export(path: Path) -> Path:
    """An export directory, or the export inside a run directory: `tune`'s winner/ or `train`'s export/."""
    path = Path(path)
    for candidate in (path, path / "winner", path / "export"):
        if (candidate / METADATA).is_file():
            return candidate
    raise ExportError(
        f"{path}: no {METADATA} here, in {path / 'winner'} (a tune run) or in {path / 'export'} (a train run); "
        "pass an export directory or the run directory that holds one"
    )


def export_config(export: Path, overrides: list[str] | None = None) -> Any:
    """The ExperimentConfig an export was trained with (its raytune_ft.json), with OVERRIDES applied; ConfigError
    (every problem at once) when they do not validate."""
    from raytune_ft.config.loader import ConfigError, ConfigIssue, validate_raw

    origin = str(export / METADATA)
    raw = json.loads((export / METADATA).read_text()).get("experiment")
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("", "no experiment recorded", origin)])
    return validate_raw(raw, None, origin, list(overrides or []), base_dir=export)


def serving_dtype(setting: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU whatever the setting: CPU half-precision matmuls are slower, not faster, on most machines."""
    if device.type != "cuda":
        return torch.float32
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]


class LoadedModel:
    """Tokenizer and model of one export, with the metadata the API shows at GET /v1/models."""

    def __init__(self, export_dir: Path, num_threads: int | None = None, dtype: str = "auto") -> None:
        from transformers import AutoTokenizer

        self.export_dir = find_export(export_dir)
        self.meta: dict[str, Any] = json.loads((self.export_dir / METADATA).read_text())
        self.task: str = self.meta["task"]
        if num_threads:
            torch.set_num_threads(max(1, int(num_threads)))
        self.threads = torch.get_num_threads()
        experiment = self.meta.get("experiment", {})
        self.name: str = experiment.get("name") or self.export_dir.name
        self.max_length: int = int(experiment.get("data", {}).get("max_length") or 512)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.export_dir))
        self.model = self._load()
        if self.task in CAUSAL_TASKS and self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # a replica given a GPU (serve.num_gpus) sees it here; one without sees none (Ray hides the others)
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.dtype = serving_dtype(dtype, self.device)
        self.model.to(self.device, self.dtype)
        self.model.eval()
        classes = self.meta.get("classes") or []
        names = self.meta.get("label_names") or classes
        self.labels: list[str] = [str(n) for n in names] or (
            [str(i) for i in range(self.model.config.num_labels)] if self.task not in CAUSAL_TASKS else []
        )
        self._load_task_heads()
        self.loaded_at = time.time()

    def _load(self) -> Any:
        """The export's model (an adapter-only export: merged into its base, see export.load_exported_model)."""
        from raytune_ft.export import load_exported_model

        labels = self.meta.get("label_names") or self.meta.get("classes")
        base = self.meta.get("provenance", {}).get("base_model")
        return load_exported_model(self.export_dir, self.task, base, labels)

    def _load_task_heads(self) -> None:
        """A multi-task export: each extra classification task's head and labels, beside the primary model."""
        from raytune_ft.modeling.multitask import HEADS_FILE, is_decoder

        tasks = self.meta.get("tasks") or []
        self.primary_task: str | None = next((t["name"] for t in tasks if t.get("primary")), None)
        self.task_labels: dict[str, list[str]] = {}
        self.heads: dict[str, torch.nn.Linear] = {}
        extra = [t for t in tasks if not t.get("primary") and t["task"] == "sequence-classification"]
        if not extra:
            return
        from safetensors.torch import load_file

        state = load_file(str(self.export_dir / HEADS_FILE))
        self.decoder = is_decoder(self.model)
        for t in extra:
            weight, bias = state[f"{t['name']}.weight"], state[f"{t['name']}.bias"]
            head = torch.nn.Linear(weight.shape[1], weight.shape[0])
            head.load_state_dict({"weight": weight, "bias": bias})
            self.heads[t["name"]] = head.to(self.device, self.dtype).eval()
            self.task_labels[t["name"]] = [str(n) for n in (t.get("label_names") or t.get("classes") or [])]

    def info(self) -> dict[str, Any]:
        checkpoint = self.meta.get("checkpoint", {})
        return {
            "id": self.name,
            "object": "model",
            "task": self.task,
            "labels": self.labels if self.task not in CAUSAL_TASKS else None,
            "tasks": {name: labels for name, labels in self.task_labels.items()} or None,
            "base_model": self.meta.get("provenance", {}).get("base_model"),
            "checkpoint_step": checkpoint.get("step"),
            "metrics": self.meta.get("metrics", {}),
            "test_metrics": self._test_metrics(),
            "exported": self.meta.get("exported"),
            "max_length": self.max_length,
            "export_dir": str(self.export_dir),
            "threads": self.threads,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def _test_metrics(self) -> dict[str, Any] | None:
        path = self.export_dir / TEST_METRICS
        return json.loads(path.read_text()) if path.is_file() else None

    @torch.inference_mode()
    def classify(self, texts: list[str], task: str | None = None) -> list[dict[str, Any]]:
        """One forward pass over all TEXTS (padded to the longest); predictions in input order. TASK: a task of a
        multi-task export (default: the export's own)."""
        batch = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        batch = batch.to(self.device)
        labels = self.labels
        if task is None or task == self.primary_task:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        elif task in self.heads:
            from raytune_ft.modeling.multitask import backbone_of, pool

            backbone = backbone_of(self.model)
            hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            logits = self.heads[task](pool(hidden, batch["attention_mask"], self.decoder))
            labels = self.task_labels[task]
        else:
            known = ", ".join(n for n in [self.primary_task, *self.heads] if n) or "none: a single-task export"
            raise ValueError(f"unknown task '{task}'; this export's classification tasks: {known}")
        return predictions(logits, labels)

    def classify_items(self, items: list[tuple[str | None, str]]) -> list[dict[str, Any]]:
        """(task, text) pairs from several requests: one forward pass per task, answers in input order."""
        return by_key(items, lambda task, texts: self.classify(texts, task))

    @torch.inference_mode()
    def complete(
        self, prompt: str, max_tokens: int, temperature: float, top_p: float, seed: int | None
    ) -> dict[str, Any]:
        """One completion, in one `generate` call: greedy at temperature 0, sampled otherwise (seeded when SEED is
        given); it ends where a served answer ends (serving_stop_ids). The in-process reference
        that served answers are checked against."""
        stops = serving_stop_ids(self.tokenizer, self.model)
        encoded = self.tokenizer(prompt, return_tensors="pt", truncation=True, max_length=self.max_length)
        encoded = encoded.to(self.device)
        generator_seed = seed if seed is not None else int(time.time_ns() % (2**31))
        torch.manual_seed(generator_seed)
        sample = temperature > 0
        output = self.model.generate(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            max_new_tokens=max_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=stops or None,
        )
        new = output[0, encoded["input_ids"].shape[1] :]
        ended = [k for k, token in enumerate(new.tolist()) if token in stops]
        finished = bool(ended)
        new = new[: ended[0]] if ended else new
        return {
            "text": self.tokenizer.decode(new, skip_special_tokens=True),
            "finish_reason": "stop" if finished else "length",
            "prompt_tokens": int(encoded["input_ids"].shape[1]),
            "completion_tokens": int(new.shape[0]),
        }

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """MESSAGES ({role, content}) rendered with the export's own chat template (saved with its tokenizer, so
        as training rendered them) and the assistant's generation prompt, as token ids."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ExportError(f"{self.export_dir}: the tokenizer has no chat template to render conversations with")
        return chat_prompt_ids(self.tokenizer, messages)

    def answer(self, conversations: list[list[dict[str, str]]], max_new_tokens: int, batch_size: int = 16) -> list[str]:
        """The assistant's next answer to each conversation (a list of {role, content}), greedy, in input order."""
        from raytune_ft.generation import answer_text, greedy_answers, stop_ids

        ids = greedy_answers(
            self.model,
            [self.prompt_ids(messages) for messages in conversations],
            max_new_tokens=max_new_tokens,
            stop=stop_ids(self.tokenizer),
            pad_id=self.tokenizer.pad_token_id,
            batch_size=batch_size,
        )
        return [answer_text(self.tokenizer, answer) for answer in ids]


def serving_stop_ids(tokenizer: Any, model: Any) -> list[int]:
    """Where a served answer ends: the tokenizer's end of sequence and end-of-turn markers (generation.stop_ids),
    and the end-of-sequence ids of the model's generation config, where `generate` stops too (a tokenizer
    without an eos token, beside a model config that names one, is common for causal LMs)."""
    found = stop_ids(tokenizer)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in configured if isinstance(configured, list) else [configured]:
        if isinstance(token, int) and token not in found:
            found.append(token)
    return found


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """MESSAGES rendered with TOKENIZER's chat template and the assistant's generation prompt, as token ids."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the template writes every marker itself (a BOS included): the tokenizer must add none
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def by_key(items: list[tuple[Any, str]], classify: Any) -> list[dict[str, Any]]:
    """(key, text) pairs from several requests: CLASSIFY(key, texts) once per key, answers in input order."""
    out: list[dict[str, Any]] = [{} for _ in items]
    for key in dict.fromkeys(key for key, _ in items):
        rows = [i for i, (k, _) in enumerate(items) if k == key]
        for i, answer in zip(rows, classify(key, [items[i][1] for i in rows]), strict=True):
            out[i] = answer
    return out


def predictions(logits: torch.Tensor, labels: list[str]) -> list[dict[str, Any]]:
    """Each row of classifier LOGITS as the API answers it: label, label id and every label's probability."""
    out = []
    for row in torch.softmax(logits.float(), dim=-1).tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append(
            {
                "label": _label(labels, best),
                "label_id": best,
                "probs": {_label(labels, i): p for i, p in enumerate(row)},
            }
        )
    return out


def _label(labels: list[str], i: int) -> str:
    return labels[i] if i < len(labels) else str(i)
