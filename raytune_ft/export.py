"""Export a verified checkpoint as a plain Hugging Face model directory that Serve and users load as is.

The directory holds safetensors weights (LoRA merged), config, tokenizer and `raytune_ft.json` with the
experiment, metrics, data report and provenance. Nothing here unpickles: weights come from safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from raytune_ft import __version__
from raytune_ft.config import ExperimentConfig
from raytune_ft.layout import METADATA
from raytune_ft.train.checkpoint import TRAINABLE, CheckpointError, verify_checkpoint

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "ray", "pyarrow", "raytune_ft")


def export_checkpoint(
    checkpoint_dir: Path,
    cfg: ExperimentConfig,
    out_dir: Path,
    *,
    classes: list[str] | None,
    data_report: dict[str, Any],
    probe: dict[str, list] | None = None,
    pad_token_id: int | None = None,
    tasks: list[dict[str, Any]] | None = None,
) -> Path:
    """Rebuild the model as trained, load the checkpoint's trainable weights, merge, save, reload and compare
    with the logits recorded at that step; the export is moved into place only if they match."""
    from safetensors.torch import load_file

    from raytune_ft.model_source import load_tokenizer
    from raytune_ft.modeling import build_model, merge_for_export
    from raytune_ft.train.batches import collate

    state = verify_checkpoint(checkpoint_dir)
    torch.manual_seed(cfg.seed)
    # the attention kernel is a training choice: flash_attention_2 would need a GPU where exports are made
    as_built = cfg.model.model_copy(update={"attn_implementation": "auto"})
    model = build_model(as_built, cfg.finetune, len(classes) if classes else None, cfg.data.label_names)
    if tasks:
        from raytune_ft.modeling.multitask import MultiTaskModel, TaskHead

        heads = [TaskHead(t["name"], t["task"], len(t["classes"] or []) or None) for t in tasks]
        model = MultiTaskModel(model, cfg.multitask.primary, heads)
    weights = load_file(str(checkpoint_dir / TRAINABLE))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise CheckpointError(
            f"{checkpoint_dir / TRAINABLE}: {len(unexpected)} tensors do not belong to this model "
            f"(e.g. {unexpected[:3]}); the checkpoint is from another model or fine-tuning method"
        )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if trainable - set(weights):
        raise CheckpointError(
            f"{checkpoint_dir / TRAINABLE}: trainable weights missing: {sorted(trainable - set(weights))[:3]}"
        )
    merged = merge_for_export(model.primary if tasks else model).eval()

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code).save_pretrained(tmp)
    if tasks:
        from safetensors.torch import save_file

        from raytune_ft.modeling.multitask import HEADS_FILE

        # the extra tasks' heads beside the plain model of the primary task (which from_pretrained loads alone)
        save_file(model.head_state(), str(tmp / HEADS_FILE))

    check: dict[str, Any] = {}
    probe_file = checkpoint_dir / "probe_logits.safetensors"
    if probe is not None and probe_file.exists():
        expected = load_file(str(probe_file))["logits"]
        reloaded = _auto_class(cfg).from_pretrained(tmp).eval()
        batch = collate(probe, list(range(expected.shape[0])), pad_token_id or 0, torch.device("cpu"))
        with torch.no_grad():
            got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        diff = float((got - expected).abs().max())
        check = {"probe_rows": int(expected.shape[0]), "max_abs_logit_diff": diff}
        if diff > 1e-3:
            raise CheckpointError(f"exported model disagrees with the trained model (max |logit diff| {diff:.2e})")

    meta = {
        "experiment": cfg.model_dump(mode="json", by_alias=True),
        "task": cfg.model.task,
        "classes": classes,
        "label_names": cfg.data.label_names,
        "checkpoint": {"path": str(checkpoint_dir), "step": state["step"], "epoch": state.get("epoch")},
        "metrics": state.get("metrics", {}),
        "data_report": data_report,
        "reload_check": check,
        "provenance": provenance(cfg, data_report),
        # multi-task: the experiment's own task by its name, then each extra task (label set, data report)
        "tasks": [{"name": cfg.multitask.primary, "task": cfg.model.task, "primary": True}, *_with_files(cfg, tasks)]
        if tasks
        else [],
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / METADATA).write_text(json.dumps(meta, indent=2, default=float))
    from raytune_ft.modelcard import write_model_card

    write_model_card(tmp)  # README.md + experiment.yaml; rewritten when test or eval results are added
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _with_files(cfg: ExperimentConfig, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each extra task's record with its data file and that file's SHA-256, as the model card lists them."""
    from raytune_ft.data.store import file_sha256

    files = {t.name: Path(t.data.path) for t in cfg.tasks}
    out = []
    for task in tasks:
        source = files.get(task["name"])
        data = {"path": str(source), "sha256": file_sha256(source) if source and source.is_file() else None}
        out.append({**task, "data": data})
    return out


def _auto_class(cfg: ExperimentConfig) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if cfg.model.task == "sequence-classification" else AutoModelForCausalLM


def provenance(cfg: ExperimentConfig, data_report: dict[str, Any]) -> dict[str, Any]:
    from raytune_ft.data.store import file_sha256

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    source = Path(cfg.data.path)
    return {
        "raytune_ft": __version__,
        "git_commit": _git_commit(),
        "packages": versions,
        "data": {
            "path": str(source),
            "sha256": file_sha256(source) if source.is_file() else None,
            "split_fingerprint": data_report.get("fingerprint"),
        },
        "base_model": cfg.model.name_or_path,
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
