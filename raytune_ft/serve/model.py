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

from raytune_ft.export import METADATA


class ExportError(ValueError):
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
        if self.task == "causal-lm":
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(str(self.export_dir))
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        else:
            from transformers import AutoModelForSequenceClassification

            self.model = AutoModelForSequenceClassification.from_pretrained(str(self.export_dir))
        # a replica given a GPU (serve.num_gpus) sees it here; one without sees none (Ray hides the others)
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.dtype = serving_dtype(dtype, self.device)
        self.model.to(self.device, self.dtype)
        self.model.eval()
        classes = self.meta.get("classes") or []
        names = self.meta.get("label_names") or classes
        self.labels: list[str] = [str(n) for n in names] or [str(i) for i in range(self.model.config.num_labels)]
        self.loaded_at = time.time()

    def info(self) -> dict[str, Any]:
        checkpoint = self.meta.get("checkpoint", {})
        return {
            "id": self.name,
            "object": "model",
            "task": self.task,
            "labels": self.labels if self.task != "causal-lm" else None,
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
        path = self.export_dir / "test_metrics.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @torch.inference_mode()
    def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        """One forward pass over all TEXTS (padded to the longest); predictions in input order."""
        batch = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        batch = batch.to(self.device)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        probs = torch.softmax(logits.float(), dim=-1).tolist()
        out = []
        for row in probs:
            best = max(range(len(row)), key=row.__getitem__)
            out.append(
                {
                    "label": self.labels[best] if best < len(self.labels) else str(best),
                    "label_id": best,
                    "probs": {self._label(i): p for i, p in enumerate(row)},
                }
            )
        return out

    def _label(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) else str(i)

    @torch.inference_mode()
    def complete(
        self, prompt: str, max_tokens: int, temperature: float, top_p: float, seed: int | None
    ) -> dict[str, Any]:
        """One completion: greedy at temperature 0, sampled otherwise (seeded when SEED is given)."""
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
        )
        new = output[0, encoded["input_ids"].shape[1] :]
        eos = self.tokenizer.eos_token_id
        finished = eos is not None and bool((new == eos).any())
        return {
            "text": self.tokenizer.decode(new, skip_special_tokens=True),
            "finish_reason": "stop" if finished else "length",
            "prompt_tokens": int(encoded["input_ids"].shape[1]),
            "completion_tokens": int(new.shape[0]),
        }
