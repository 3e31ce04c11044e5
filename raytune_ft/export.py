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
from raytune_ft.train.checkpoint import PROBE_GENERATIONS, TRAINABLE, CheckpointError, verify_checkpoint

ADAPTER_CONFIG = "adapter_config.json"  # what peft saves beside an adapter's weights
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
    from raytune_ft.train.batches import collate, model_inputs
    from raytune_ft.train.evaluate import probe_slice

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
    adapter_only = cfg.finetune.method == "lora" and cfg.finetune.lora.export == "adapter" and not tasks
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter_only:
        model.eval().save_pretrained(tmp, safe_serialization=True)  # a PeftModel saves its adapter alone
    else:
        merge_for_export(model.primary if tasks else model).eval().save_pretrained(tmp, safe_serialization=True)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    template = None
    if cfg.model.task == "chat":
        from raytune_ft.data.chat import resolve_template

        # serving renders prompts with the tokenizer's own template: it must be the one training rendered with
        template, tokenizer.chat_template = resolve_template(tokenizer, cfg.data.chat.template)
    tokenizer.save_pretrained(tmp)
    if tasks:
        from safetensors.torch import save_file

        from raytune_ft.modeling.multitask import HEADS_FILE

        # the extra tasks' heads beside the plain model of the primary task (which from_pretrained loads alone)
        save_file(model.head_state(), str(tmp / HEADS_FILE))

    check: dict[str, Any] = {}
    probe_file = checkpoint_dir / "probe_logits.safetensors"
    if probe is not None and probe_file.exists():
        expected = load_file(str(probe_file))["logits"]
        reloaded = load_exported_model(tmp, cfg.model.task, cfg.model.name_or_path, classes, torch.float32)
        batch = collate(probe, list(range(expected.shape[0])), pad_token_id or 0, torch.device("cpu"))
        with torch.no_grad():
            got = probe_slice(reloaded(**model_inputs(batch)).logits.float())
        diff = float((got - expected).abs().max())
        check = {"probe_rows": int(expected.shape[0]), "max_abs_logit_diff": diff}
        if diff > 1e-3:
            raise CheckpointError(f"exported model disagrees with the trained model (max |logit diff| {diff:.2e})")
        generated = checkpoint_dir / PROBE_GENERATIONS
        if generated.is_file():
            check.update(_generation_check(reloaded, tokenizer, json.loads(generated.read_text()), pad_token_id))

    meta = {
        "experiment": cfg.model_dump(mode="json", by_alias=True),
        "task": cfg.model.task,
        "classes": classes,
        "label_names": cfg.data.label_names,
        # chat: the template the tokenizer carries (a name, or "tokenizer" for its own), and whether it is the
        # adapter alone (loaded on provenance.base_model)
        "chat_template": template,
        "adapter_only": adapter_only,
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


def _generation_check(model: Any, tokenizer: Any, probe: dict[str, Any], pad_id: int | None) -> dict[str, Any]:
    """The export's greedy answers to the prompts the checkpoint's model answered (one batch, as there): how many
    are the same tokens. Recorded, not enforced: a near-tie between two tokens may tip either way after the
    merge's rounding, which the logit check above bounds."""
    from raytune_ft.generation import greedy_answers, stop_ids

    answers = greedy_answers(
        model,
        probe["prompts"],
        max_new_tokens=probe["max_new_tokens"],
        stop=stop_ids(tokenizer),
        pad_id=pad_id if pad_id is not None else tokenizer.pad_token_id,
        batch_size=len(probe["prompts"]),
    )
    same = sum(a == b for a, b in zip(answers, probe["answers"], strict=True))
    return {"generation_probe_rows": len(answers), "generation_same_as_training": same}


def load_exported_model(
    export_dir: Path, task: str, base_model: str | None, labels: list[str] | None = None, dtype: Any = None
) -> Any:
    """An export's model in eval mode. An adapter-only export (`finetune.lora.export: adapter`: adapter_config.json
    and no config.json) is its base model (BASE_MODEL, the provenance's) with the adapter loaded and merged in:
    served merged, it runs as fast as a merged export; only the download is smaller. LABELS: a classifier's, for
    the size of its head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM
    export_dir = Path(export_dir)
    options: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    if (export_dir / "config.json").is_file() or not (export_dir / ADAPTER_CONFIG).is_file():
        return auto.from_pretrained(export_dir, **options).eval()
    from peft import PeftModel
    from transformers import AutoTokenizer

    from raytune_ft.model_source import resolve_model_source

    if not base_model:
        raise CheckpointError(f"{export_dir}: an adapter-only export whose {METADATA} names no base model")
    if task == "sequence-classification" and labels:
        options["num_labels"] = len(labels)
    base = auto.from_pretrained(resolve_model_source(base_model), **options)
    # tokens training added grew the embeddings, which the adapter saved at that size: the base must have as many
    # rows before the adapter loads into it
    tokens = len(AutoTokenizer.from_pretrained(export_dir))
    if tokens > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(tokens)
    return PeftModel.from_pretrained(base, str(export_dir)).merge_and_unload().eval()


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
