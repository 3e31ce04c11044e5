"""Many LoRA adapters on one base model (raytune_ft.serve.adapters), on tiny random Llama and BERT bases.

Each adapter export is made with peft the way `finetune.lora.export: adapter` writes one, with its LoRA B matrices
and its head given random non-zero values (peft starts B at zero, which would hide a wrong adapter), and the host's
answers are compared with `load_exported_model`'s, which merges the adapter into its own copy of the base.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from tiny_models import bert_config, chat_tokenizer, llama_config
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    BertModel,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from raytune_ft.export import load_exported_model
from raytune_ft.layout import METADATA
from raytune_ft.serve.adapters import AdapterError, AdapterExport, AdapterHost, adapter_exports
from raytune_ft.serve.model import ExportError, LoadedModel

CLS = "sequence-classification"
LABELS = ["neg", "neu", "pos"]
TEXTS = ["good film", "bad", "a long and rather boring review of a film", "ok"]


def make_base(folder: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny random Llama saved with the chat tokenizer; a wider weight spread than the default so logits differ."""
    tokenizer = chat_tokenizer()
    torch.manual_seed(seed)
    config = llama_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, initializer_range=0.2, **overrides)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_bert_base(folder: Path) -> Path:
    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    BertModel(bert_config(len(tokenizer), initializer_range=0.2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-zero LoRA B matrices and heads (peft initialises B to zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def write_meta(folder: Path, base: Path | str, name: str, task: str, **extra: Any) -> None:
    meta = {
        "task": task,
        "classes": LABELS if task == CLS else None,
        "label_names": LABELS if task == CLS else None,
        "adapter_only": True,
        "chat_template": "chatml" if task == "chat" else None,
        "provenance": {"base_model": str(base)},
        "experiment": {"name": name, "data": {"max_length": 64}},
        **extra,
    }
    (folder / METADATA).write_text(json.dumps(meta))


def make_export(
    folder: Path,
    base: Path,
    name: str,
    task: str = "causal-lm",
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 1,
    **lora: Any,
) -> Path:
    """An adapter-only export of BASE made with peft: LoRA on TARGETS (and the head of a classifier)."""
    classification = task == CLS
    bert = (base / "config.json").is_file() and json.loads((base / "config.json").read_text())["model_type"] == "bert"
    if classification:
        cls = BertForSequenceClassification if bert else LlamaForSequenceClassification
        net = cls.from_pretrained(base, num_labels=len(LABELS))
    else:
        net = LlamaForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(
        target_modules=list(targets),
        task_type=peft.TaskType.SEQ_CLS if classification else peft.TaskType.CAUSAL_LM,
        modules_to_save=(["classifier"] if bert else ["score"]) if classification else None,
        **{"r": 4, "lora_alpha": 8, **lora},
    )
    model = peft.get_peft_model(net, config)
    randomise(model, seed)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    write_meta(folder, base, name, task)
    return folder


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """One base and three adapters of it: two causal (one of them chat, with rsLoRA on other modules), one
    classifier."""
    root = tmp_path_factory.mktemp("adapters")
    base = make_base(root / "base")
    return {
        "base": base,
        "alpha": make_export(root / "alpha", base, "alpha", seed=1),
        "beta": make_export(
            root / "beta",
            base,
            "beta",
            "chat",
            ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"),
            seed=2,
            r=2,
            lora_alpha=4,
            use_rslora=True,
        ),
        "gamma": make_export(root / "gamma", base, "gamma", CLS, ("q_proj", "v_proj", "up_proj"), seed=3),
    }


@pytest.fixture(scope="module")
def host(family) -> AdapterHost:
    return AdapterHost(adapter_exports([family["alpha"], family["beta"], family["gamma"]]))


@pytest.fixture(scope="module")
def reference(family) -> dict[str, torch.nn.Module]:
    """Each causal export merged into its own base, and the base itself (key None)."""
    return {
        "alpha": load_exported_model(family["alpha"], "causal-lm", str(family["base"])),
        "beta": load_exported_model(family["beta"], "chat", str(family["base"])),
        None: LlamaForCausalLM.from_pretrained(family["base"]).eval(),
    }


def ids(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (rows, 9), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def host_logits(host: AdapterHost, rows: list[str | None], input_ids: torch.Tensor) -> torch.Tensor:
    host.select(rows)
    return host.causal_lm(input_ids=input_ids).logits


@torch.inference_mode()
def ref_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits


def test_the_exports_are_read_with_their_ids_tasks_labels_and_chat_flag(family, host):
    exports = adapter_exports([family["alpha"], family["beta"], family["gamma"]])
    assert [(e.id, e.task, e.labels, e.chat) for e in exports] == [
        ("alpha", "causal-lm", [], True),  # the base's tokenizer is the chat one: every export carries its template
        ("beta", "chat", [], True),
        ("gamma", CLS, LABELS, True),
    ]
    assert {e.base_model for e in exports} == {str(family["base"])}
    assert host.loaded() == ["alpha", "beta", "gamma"]
    assert host.tokenizer("alpha").pad_token == "<pad>"


def test_each_causal_adapter_matches_its_merged_export_and_a_mixed_batch_gives_each_row_its_own(host, reference):
    x = ids(4)
    for name in ("alpha", "beta"):
        want = ref_logits(reference[name], x)
        assert (want - ref_logits(reference[None], x)).abs().max() > 0.05  # the adapter changes the answers
        torch.testing.assert_close(host_logits(host, [name] * 4, x), want, atol=1e-4, rtol=1e-4)
    rows = ["alpha", "beta", None, "alpha"]
    mixed = host_logits(host, rows, x)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], ref_logits(reference[name], x)[i], atol=1e-4, rtol=1e-4)
    # the base alone: no selection, or every row None
    torch.testing.assert_close(host_logits(host, [None] * 4, x), ref_logits(reference[None], x), atol=1e-5, rtol=0)


def test_a_classifier_and_causal_adapters_share_the_base(family, host, reference):
    shell = host.classifier("gamma")
    assert shell.model is host.backbone is host.causal_lm.model  # one backbone: the classifier adds its head alone
    assert not any(t.is_meta for t in shell.parameters()) and shell.config.num_labels == len(LABELS)
    want = LoadedModel(family["gamma"]).classify(TEXTS)
    got = host.classify("gamma", TEXTS)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert [g["label_id"] for g in got] == [w["label_id"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert list(g["probs"]) == LABELS
        assert g["probs"] == pytest.approx(w["probs"], abs=1e-4)
    assert len({g["label"] for g in got}) > 1 or max(max(w["probs"].values()) for w in want) < 0.99
    items = [("gamma", TEXTS[2]), ("gamma", TEXTS[0])]
    for answer, w in zip(host.classify_items(items), [want[2], want[0]], strict=True):
        assert answer["probs"] == pytest.approx(w["probs"], abs=1e-4)
    x = ids(2, seed=1)
    torch.testing.assert_close(
        host_logits(host, ["alpha"] * 2, x), ref_logits(reference["alpha"], x), atol=1e-4, rtol=1e-4
    )
    with pytest.raises(AdapterError, match="not a classifier"):
        host.classify("alpha", TEXTS)
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        host.classify_items([("nope", "x")])


def test_unload_frees_the_weights_and_load_brings_the_same_answers_back(family, reference):
    host = AdapterHost(adapter_exports([family["alpha"], family["beta"]]))
    x = ids(3, seed=2)
    before = host_logits(host, ["beta"] * 3, x)
    host.unload("beta")
    assert host.loaded() == ["alpha"]
    assert all("beta" not in m.lora_A and "beta" not in m.lora_B for m in host.modules.values())
    assert {n for n, m in host.modules.items() if m.lora_A} == {
        f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    }
    with pytest.raises(AdapterError, match="'beta' is not loaded"):
        host.select(["beta"])
    host.unload("beta")  # nothing to do
    host.load("beta")
    host.load("beta")  # idempotent
    assert host.loaded() == ["alpha", "beta"]
    torch.testing.assert_close(host_logits(host, ["beta"] * 3, x), before, atol=0, rtol=0)
    torch.testing.assert_close(before, ref_logits(reference["beta"], x), atol=1e-4, rtol=1e-4)


def test_an_unload_during_a_forward_that_uses_the_adapter_waits_for_its_end(family, reference):
    host = AdapterHost(adapter_exports([family["alpha"]]))
    x = ids(2, seed=3)
    layer = host.backbone.layers[0]
    handle = layer.register_forward_hook(lambda *_: host.unload("alpha"))  # between layer 0 and layer 1
    try:
        got = host_logits(host, ["alpha", None], x)
    finally:
        handle.remove()
    torch.testing.assert_close(got[0], ref_logits(reference["alpha"], x)[0], atol=1e-4, rtol=1e-4)
    assert host.loaded() == [] and all(not m.lora_A for m in host.modules.values())


def test_selection_is_per_thread(host, reference):
    x = ids(3, seed=4)
    want = {name: ref_logits(reference[name], x) for name in ("alpha", "beta")}
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            host.select([name] * 3)
            start.wait()
            for _ in range(15):
                with torch.inference_mode():
                    got = host.causal_lm(input_ids=x).logits
                torch.testing.assert_close(got, want[name], atol=1e-4, rtol=1e-4)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("alpha", "beta")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert host.selected() != ["alpha"] * 3  # the main thread's own selection is untouched by the others


def test_the_generation_engine_answers_each_request_with_its_own_adapter(host, reference):
    """host.select as the engine's rows_hook: requests of two adapters and of the base, generating in one batch,
    each get the greedy answer of their own merged export."""
    import asyncio

    from raytune_ft.generation import greedy_answers
    from raytune_ft.serve.engine import Finish, GenerationEngine, Sampling

    tokenizer = host.tokenizer("alpha")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [list(tokenizer("hello there")["input_ids"]), list(tokenizer("a b")["input_ids"])]
    requests = [(p, a) for p in prompts for a in ("alpha", "beta", None)]
    engine = GenerationEngine(host.causal_lm, pad_id=pad, stop_ids=[eos], max_batch_size=8, rows_hook=host.select)

    async def one(prompt: list[int], adapter: str | None) -> list[int]:
        stream = engine.generate(prompt, Sampling(max_new_tokens=8), adapter=adapter)
        return [t async for t in stream if not isinstance(t, Finish)]

    async def every() -> list[list[int]]:
        return list(await asyncio.gather(*(one(p, a) for p, a in requests)))

    try:
        got = asyncio.run(every())
    finally:
        engine.close()
    want = [greedy_answers(reference[a], [p], max_new_tokens=8, stop=[eos], pad_id=pad)[0] for p, a in requests]
    assert got == want
    assert len({tuple(w) for w in want[:3]}) > 1  # the adapters answer differently


def test_a_bert_classifier_adapter_matches_its_merged_export(tmp_path):
    base = make_bert_base(tmp_path / "bert")
    export = make_export(tmp_path / "sent", base, "sent", CLS, ("query", "value"), seed=5)
    host = AdapterHost(adapter_exports([export]))
    assert host.causal_lm is None and type(host.backbone).__name__ == "BertModel"
    reference = load_exported_model(export, CLS, str(base), LABELS)
    tokenizer = AutoTokenizer.from_pretrained(export)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = torch.softmax(reference(**batch).logits, -1)
    got = host.classify("sent", TEXTS)
    for g, row in zip(got, want.tolist(), strict=True):
        assert g["probs"] == pytest.approx(dict(zip(LABELS, row, strict=True)), abs=1e-4)
    assert [g["label_id"] for g in got] == want.argmax(-1).tolist()


# --- what adapter_exports refuses


def test_a_folder_of_exports_expands_and_a_clash_of_names_gets_a_suffix(family, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for name in ("b", "a"):
        shutil.copytree(family["alpha"], folder / name)
    (folder / "notes").mkdir()  # a folder without an export is passed over
    run = tmp_path / "run"
    shutil.copytree(family["alpha"], run / "export")
    exports = adapter_exports([folder, run, family["alpha"]])
    assert [e.id for e in exports] == ["alpha", "alpha-2", "alpha-3", "alpha-4"]
    assert [e.path for e in exports] == [folder / "a", folder / "b", run / "export", family["alpha"]]
    # the same export twice is one adapter
    assert [e.id for e in adapter_exports([family["alpha"], family["alpha"]])] == ["alpha"]


def test_what_is_refused(family, tmp_path):
    with pytest.raises(ExportError, match="no adapter exports"):
        adapter_exports([])
    merged = tmp_path / "merged"
    merged.mkdir()
    write_meta(merged, family["base"], "merged", "causal-lm", adapter_only=False)
    with pytest.raises(ExportError, match="merged: a merged export; serve it alone or export with finetune.lora"):
        adapter_exports([family["alpha"], merged])
    with pytest.raises(ExportError, match="no raytune_ft.json"):
        adapter_exports([tmp_path / "nothing"])

    dora = make_export(tmp_path / "dora", family["base"], "dora", use_dora=True)
    with pytest.raises(ExportError, match=r"dora: DoRA \(use_dora\) is not supported"):
        adapter_exports([dora])
    embedding = make_export(tmp_path / "emb", family["base"], "emb", targets=("embed_tokens", "q_proj"))
    with pytest.raises(ExportError, match="emb: LoRA on an embedding layer"):
        adapter_exports([embedding])
    patterned = make_export(tmp_path / "pat", family["base"], "pat", rank_pattern={"q_proj": 2})
    with pytest.raises(ExportError, match=r"per-module ranks \(rank_pattern\)"):
        adapter_exports([patterned])


def test_an_adapter_of_another_base_is_refused_and_two_names_of_one_base_are_not(family, tmp_path):
    other_base = make_base(tmp_path / "wide", hidden_size=48)
    other = make_export(tmp_path / "other", other_base, "other")
    with pytest.raises(ExportError) as caught:
        adapter_exports([family["alpha"], other])
    message = str(caught.value)
    assert message.startswith(
        f"{other}: its base model is {other_base}, the deployment's base is {family['base']} (from {family['alpha']})"
    )
    assert "hidden_size (48 vs 32)" in message
    first, mismatched = adapter_exports([family["alpha"]])[0], adapter_exports([other])[0]
    with pytest.raises(ExportError, match="its base model is"):
        AdapterHost([first, mismatched])  # the host checks too

    # the same model under another name: a copy, and a link to it
    copy = tmp_path / "copy"
    shutil.copytree(family["base"], copy)
    link = tmp_path / "link"
    link.symlink_to(family["base"])
    renamed = []
    for base in (copy, link):
        export = tmp_path / f"on-{base.name}"
        shutil.copytree(family["alpha"], export)
        write_meta(export, base, f"on-{base.name}", "causal-lm")
        renamed.append(export)
    assert [e.id for e in adapter_exports([family["alpha"], *renamed])] == ["alpha", "on-copy", "on-link"]

    # the same config, other weights: another model
    twin = make_base(tmp_path / "twin", seed=7)
    on_twin = tmp_path / "on-twin"
    shutil.copytree(family["alpha"], on_twin)
    write_meta(on_twin, twin, "on-twin", "causal-lm")
    with pytest.raises(ExportError, match="different weights"):
        adapter_exports([family["alpha"], on_twin])
    with pytest.raises(ExportError, match="not both local model directories"):
        adapter_exports([family["alpha"], _rebased(family["alpha"], tmp_path / "hub", "org/model")])


def _rebased(export: Path, to: Path, base: str) -> Path:
    shutil.copytree(export, to)
    write_meta(to, base, to.name, "causal-lm")
    return to


def test_an_adapter_export_record_is_frozen(family):
    export = adapter_exports([family["alpha"]])[0]
    assert isinstance(export, AdapterExport) and export.max_length == 64
    with pytest.raises(AttributeError):
        export.id = "x"  # type: ignore[misc]
