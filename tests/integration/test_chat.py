"""Chat fine-tuning on the session's real Ray: the tiny chat Llama on conversations built from the real SST-2 and
tiny Shakespeare, with answer-only labels. LoRA on 2 workers with ZeRO-2 and packed rows (the session's chat_run),
full fine-tuning with ZeRO-3 through a killed worker's restart, a PBT exploit between two chat trials, and an export
that generates in process what training's evaluation generated."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from faults import Faults
from helpers import chat_cfg

from raytune_ft.data import reads_of_test_split
from raytune_ft.data.chat_templates import CHATML
from raytune_ft.generation import answer_text
from raytune_ft.serve.model import LoadedModel
from raytune_ft.train import train
from raytune_ft.train.checkpoint import PROBE_GENERATIONS, list_checkpoints, verify_checkpoint

pytestmark = pytest.mark.integration

GENERATION = ("eval_gen_exact", "eval_gen_contains", "eval_gen_token_f1")


def conversation_prefixes(data_dir: Path) -> list[list[dict[str, str]]]:
    """Each validation conversation up to its last answer: what generation is asked to continue."""
    out = []
    for text in pq.read_table(data_dir / "validation.parquet").column("messages").to_pylist():
        messages = json.loads(text)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append(messages[:last])
    return out


def test_lora_zero2_packed_chat_run_scores_answers_and_its_export_generates_the_same(chat_run):
    result, cfg = chat_run
    metrics = result.metrics
    for key in ("eval_loss", "eval_perplexity", *GENERATION, "eval_retain_perplexity", "eval_retain_worse_by"):
        assert key in metrics, key
    assert all(0.0 <= metrics[key] <= 1.0 for key in GENERATION)
    # per kind of conversation (data.columns.slice: kind), among the 8 prompts generated from
    assert any(k.startswith("eval_slice/sentiment/gen_") for k in metrics)
    assert [h["step"] for h in result.history] == [3, 6]
    # the data: conversations split as units, compared by their review (data.columns.split_text), with the length
    # policy's counts in the report the export carries
    meta = json.loads((result.export_dir / "raytune_ft.json").read_text())
    report = meta["data_report"]
    assert report["split"]["unit"] == "conversation" and report["split"]["compared"] == "column 'review'"
    assert {"train", "validation", "test"} <= set(report["tokens"]["splits"])
    assert report["tokens"]["splits"]["train"]["length_policy"]["name"] == "length_truncate"
    assert reads_of_test_split(cfg.run_dir / "data") == []  # training never reads the test split

    # the export: merged, tokenizer with the template it trained with, the card says how it was trained
    assert meta["task"] == "chat" and meta["chat_template"] == "tokenizer" and not meta["adapter_only"]
    assert "<|im_start|>" in (result.export_dir / "chat_template.jinja").read_text()
    card = (result.export_dir / "README.md").read_text()
    assert "## Chat" in card and "assistant turns only" in card and "Packing: on" in card
    check = meta["reload_check"]
    assert check["generation_same_as_training"] == check["generation_probe_rows"] == 4

    # in process, from the conversations' text: the export's template renders the prompts training generated from,
    # and its greedy answers are the ones training's evaluation produced
    probe = json.loads((result.best_checkpoint / PROBE_GENERATIONS).read_text())
    model = LoadedModel(result.export_dir)
    assert model.tokenizer.chat_template == CHATML
    by_prompt = {tuple(model.prompt_ids(m)): m for m in conversation_prefixes(cfg.run_dir / "data")}
    for prompt, trained in zip(probe["prompts"], probe["answers"], strict=True):
        messages = by_prompt[tuple(prompt)]
        [answer] = model.answer([messages], max_new_tokens=probe["max_new_tokens"])
        assert answer == answer_text(model.tokenizer, trained)


def test_full_finetuning_with_zero3_resumes_a_chat_run_after_a_killed_worker(
    tiny_chat_llama, chat_data, tmp_path, local_ray
):
    """Unpacked rows this time (the padded path), every weight trained, sharded by ZeRO-3 over 2 workers; rank 1
    is killed at step 4 and the group restarts from checkpoint 3 to the end, generation metrics included."""
    cfg = chat_cfg(
        tmp_path / "runs",
        "chat-zero3",
        tiny_chat_llama,
        chat_data,
        data={"chat": {"packing": False, "max_tokens": 256}},
        finetune={"method": "full"},
        deepspeed={"zero_stage": 3},
    )
    marker = tmp_path / "killed"
    result = train(cfg, hooks=[Faults(kill_at_step=4, rank=1, marker=str(marker))])
    assert "at step 4" in Path(f"{marker}.kill_at_step").read_text()
    assert [h["resumed_step"] for h in result.history if "resumed_step" in h] == [3]
    assert result.history[-1]["step"] == 6 and all(key in result.history[-1] for key in GENERATION)
    for checkpoint in list_checkpoints(cfg.run_dir / "train"):
        verify_checkpoint(checkpoint)
    meta = json.loads((result.export_dir / "raytune_ft.json").read_text())
    assert meta["reload_check"]["generation_same_as_training"] == meta["reload_check"]["generation_probe_rows"]


def test_pbt_exploit_between_chat_trials_moves_the_adapter_alone(chat_pbt_search):
    """Two LoRA trials meet at step 3; the weaker takes the other's checkpoint. The winner is exported as its
    adapter alone (finetune.lora.export: adapter), which the test evaluation loads onto the base model."""
    found, cfg, search = chat_pbt_search
    [exploit] = [json.loads(line) for line in (search / "exploits.jsonl").read_text().splitlines()]
    assert exploit["restored_step"] == 3 and exploit["bytes_moved"] > 0
    # what a checkpoint, and so an exploit, moves is the LoRA adapter's weights and optimizer state: none of the
    # frozen base weights (a tied lm_head included)
    written = sorted(search.glob("**/ds/mp_rank_00_model_states.pt"))
    assert written
    for path in written:
        states = torch.load(path, map_location="cpu", weights_only=False)
        assert states["module"] and all("lora_" in name for name in states["module"]), path
    assert (found.winner_dir / "adapter_config.json").is_file() and not (found.winner_dir / "config.json").exists()
    assert found.test_metrics["test_rows"] > 0 and "test_gen_token_f1" in found.test_metrics
    [answer] = LoadedModel(found.winner_dir).answer([[{"role": "user", "content": "Is it good?"}]], 4)
    assert isinstance(answer, str)
    assert len(reads_of_test_split(cfg.run_dir / "data")) == 1
