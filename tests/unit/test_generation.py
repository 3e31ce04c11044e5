"""Greedy chat answers (raytune_ft.generation), their scores (metrics.answer_scores) and `raytune-ft eval` on a chat
export, on a tiny random Llama with the byte-level chat tokenizer of tests/tiny_models.py.

The tiny model's answers are random bytes, so what is known in advance is built from its own answers: a data file
whose references are the model's answers for one slice and wrong for another scores 1 and 0 by construction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import chat_tokenizer, llama_config
from transformers import AutoTokenizer, LlamaForCausalLM

from raytune_ft.evaluation import EvalRequest, evaluate_export
from raytune_ft.evaluation.chat import answer_loss
from raytune_ft.generation import answer_text, greedy_answers, stop_ids
from raytune_ft.metrics import answer_scores, mean_answer_scores, normalize_answer
from raytune_ft.modelcard import evaluation_markdown

QUESTIONS = ["hi", "what is two plus two? answer in words, please", "x y z", "name a colour"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return chat_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    """Random weights of a wider spread than the default (0.02), so that different prompts get different answers."""
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(len(tokenizer), max_position_embeddings=256, initializer_range=0.3))


def prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --- the chat tokenizer tests and integration tests build on


def test_the_chat_tokenizer_renders_chatml_and_survives_a_save(tokenizer, tmp_path):
    assert len(tokenizer) == 259 and tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<pad>"]) == [
        256,
        257,
        258,
    ]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (257, 258)
    ids = prompt(tokenizer, user("héllo"))
    assert tokenizer.decode(ids) == "<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n"
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert prompt(again, user("héllo")) == ids and again.chat_template == tokenizer.chat_template
    assert (again.eos_token, again.pad_token, len(again)) == ("<|im_end|>", "<pad>", 259)


# --- generation


def test_stop_ids_are_eos_and_the_end_of_turn_markers_held_as_one_token(tokenizer):
    assert stop_ids(tokenizer) == [257]  # eos is <|im_end|>: listed once
    more = chat_tokenizer()
    more.add_tokens(["<|eot_id|>"], special_tokens=True)
    assert stop_ids(more) == [257, 259]
    more.eos_token = "<pad>"
    assert stop_ids(more) == [258, 257, 259]


def test_a_prompts_greedy_answer_does_not_depend_on_the_prompts_batched_with_it(model, tokenizer):
    prompts = [prompt(tokenizer, user(q)) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: the batch needs left padding
    options = {"max_new_tokens": 10, "stop": [tokenizer.eos_token_id], "pad_id": tokenizer.pad_token_id}
    alone = [greedy_answers(model, [p], **options)[0] for p in prompts]
    assert greedy_answers(model, prompts, **options) == alone
    assert greedy_answers(model, prompts[::-1], batch_size=3, **options) == alone[::-1]
    assert len({tuple(a) for a in alone}) > 1  # not one answer for all: the comparison says something
    assert greedy_answers(model, [], **options) == []


def test_an_answer_ends_before_its_first_stop_id_and_the_mode_is_given_back(model, tokenizer):
    prompts = [prompt(tokenizer, user(q)) for q in QUESTIONS]
    options = {"max_new_tokens": 10, "pad_id": tokenizer.pad_token_id}
    # <pad> as the only stop id: the model never says it, so every answer runs the full 10 tokens
    full = greedy_answers(model, prompts, stop=[tokenizer.pad_token_id], **options)
    assert all(len(a) == 10 for a in full)

    def cut(answer: list[int], stop: set[int]) -> list[int]:
        return answer[: next((k for k, t in enumerate(answer) if t in stop), len(answer))]

    eos = tokenizer.eos_token_id
    model.train()
    said = greedy_answers(model, prompts, stop=[eos], **options)
    assert model.training  # given back as it was
    assert said == [cut(a, {eos}) for a in full]
    # one row says <|im_end|> early while the others go on: the batch mixes finished (then padded) and running rows
    assert any(len(a) < 10 for a in said) and any(len(a) == 10 for a in said)
    model.eval()
    stop = [eos, full[1][3]]  # several stop ids: each answer ends at the first of any
    assert greedy_answers(model, prompts, stop=stop, **options) == [cut(a, set(stop)) for a in full]
    assert not model.training
    with pytest.raises(ValueError, match="empty prompt"):
        greedy_answers(model, [[]], stop=stop, **options)


def test_synced_generation_in_a_process_group_gives_the_same_answers(model, tokenizer, tmp_path):
    """synced=True (ZeRO-3) steps until every rank is done, through collectives: here a group of one (gloo)."""
    import torch.distributed as dist

    prompts = [prompt(tokenizer, user(q)) for q in QUESTIONS]
    options = {"max_new_tokens": 6, "stop": [tokenizer.eos_token_id], "pad_id": tokenizer.pad_token_id}
    plain = greedy_answers(model, prompts, **options)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert greedy_answers(model, prompts, synced=True, batch_size=3, **options) == plain
    finally:
        dist.destroy_process_group()


def test_answer_text_cuts_at_a_marker_spelt_in_pieces_and_strips(tokenizer):
    # split_special_tokens: the marker as bytes, as a tokenizer without it as one token would write it
    ids = tokenizer(" Paris <|im_end|>\nmore", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert 257 not in ids and answer_text(tokenizer, ids) == "Paris"
    ids = tokenizer("  two words <|eot_id|> x", add_special_tokens=False)["input_ids"]
    assert answer_text(tokenizer, ids) == "two words"
    assert (
        answer_text(tokenizer, tokenizer("4 <pad>", add_special_tokens=False)["input_ids"]) == "4"
    )  # special: skipped
    assert answer_text(tokenizer, []) == ""


# --- scores


def test_answer_normalisation_and_scores_by_hand():
    assert normalize_answer("  The Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day…") == "apple day"  # articles as words only; Unicode punctuation goes
    rows = answer_scores(
        ["The answer is Paris.", "paris", "14 apples", "", "", "the cat sat"],
        ["Paris", "Paris!", "4", "", "x", "cat sat on mat"],
    )
    assert [r["exact"] for r in rows] == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    # "4" is a word of its own, not a piece of "14"; an empty reference is in any answer
    assert [r["contains"] for r in rows] == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    # "answer is paris" vs "paris": P 1/3, R 1 -> 0.5; "cat sat" vs "cat sat on mat": P 1, R 1/2 -> 2/3
    assert [r["token_f1"] for r in rows] == pytest.approx([0.5, 1.0, 0.0, 1.0, 0.0, 2 / 3])
    means = mean_answer_scores(rows, ["exact", "token_f1"])
    assert means == pytest.approx({"exact": 2 / 6, "token_f1": (0.5 + 1 + 1 + 2 / 3) / 6})
    assert mean_answer_scores([], ["exact"]) == {}
    with pytest.raises(ValueError, match="2 answers for 1 references"):
        answer_scores(["a", "b"], ["a"])


def test_answer_loss_of_a_uniform_model_is_the_log_of_the_vocabulary_size(tokenizer):
    from raytune_ft.data.chat import Conversation, Turn, tokenize_conversation

    torch.manual_seed(0)
    uniform = LlamaForCausalLM(llama_config(len(tokenizer), max_position_embeddings=256))
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    conversations = [
        Conversation((Turn("user", "hi"), Turn("assistant", "hello")), 1),
        Conversation((Turn("user", "a"), Turn("assistant", "b"), Turn("user", "c"), Turn("assistant", "dd")), 2),
    ]
    found = answer_loss(uniform, tokenizer, conversations, max_tokens=256)
    labels = [tokenize_conversation(c, tokenizer, tokenizer.chat_template).labels for c in conversations]
    # each answer's bytes and its <|im_end|>: 6 + (2 + 3) tokens, none of them the first token of its row
    assert found["tokens"] == sum(sum(1 for x in lab[1:] if x != -100) for lab in labels) == 11
    assert found["loss"] == pytest.approx(math.log(len(tokenizer)), rel=1e-5)
    assert found["perplexity"] == pytest.approx(len(tokenizer), rel=1e-4)


# --- raytune-ft eval on a chat export


def chat_meta(base: Path) -> dict[str, Any]:
    return {
        "task": "chat",
        "experiment": {
            "name": "tiny-chat",
            "model": {"name_or_path": str(base), "task": "chat"},
            "data": {"columns": {"messages": "conversation"}, "block_size": 128},
            "train": {"generation": {"prompts": 4, "max_new_tokens": 6, "metrics": ["exact", "token_f1"]}},
        },
        "provenance": {"base_model": str(base)},
    }


@pytest.fixture(scope="module")
def chat_export(model, tokenizer, tmp_path_factory) -> Path:
    export = tmp_path_factory.mktemp("chat") / "export"
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    (export / "raytune_ft.json").write_text(json.dumps(chat_meta(export)))
    return export


def test_eval_of_a_chat_export_scores_each_last_answer_per_slice(chat_export, tmp_path):
    from raytune_ft.serve.model import LoadedModel

    loaded = LoadedModel(chat_export)
    multi = [
        {"role": "system", "content": "be terse"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "what is two plus two?"},
    ]
    prompts = [user("hi"), user("name a colour"), multi, user("x y z")]
    said = loaded.answer(prompts, 6)
    assert said == [loaded.answer([p], 6)[0] for p in prompts]  # batched as alone
    assert len(set(said)) == len(said)  # each prompt its own answer: a mixed-up order would show
    # references: the model's own answers on slice "good", words it cannot say in 6 bytes on slice "bad"
    rows = [
        {"conversation": [*prompts[0], {"role": "assistant", "content": said[0]}], "source": "good"},
        {"conversation": [*prompts[1], {"role": "assistant", "content": said[1]}], "source": "good"},
        {"conversation": [*multi, {"role": "assistant", "content": said[2]}], "source": "good"},
        {"conversation": [*prompts[3], {"role": "assistant", "content": "zebra crossing"}], "source": "bad"},
        {"conversation": [*user("another"), {"role": "assistant", "content": "quite wrong"}]},
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cases = tmp_path / "edge.jsonl"
    edge = [{"text": "hi", "expected": said[0], "kind": "echo"}, {"text": "hi", "expected": "zebra", "kind": "hard"}]
    cases.write_text("".join(json.dumps(r) + "\n" for r in edge))
    request = EvalRequest(data=data, slice_columns=["source"], edge_cases=cases, latency_requests=2, batch_size=2)
    report = evaluate_export(chat_export, request, tmp_path / "out")

    m = report["metrics"]
    assert report["task"] == "chat" and m["rows"] == 5
    assert m["exact"] == pytest.approx(3 / 5) and m["token_f1"] == pytest.approx(3 / 5)
    assert m["contains"] == pytest.approx(3 / 5)
    assert m["tokens"] > 0 and m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert report["generation"]["max_new_tokens"] == 6  # the export's train.generation
    source = report["slices"]["source"]
    assert source["slices"]["good"] == {"rows": 3, "exact": 1.0, "contains": 1.0, "token_f1": 1.0}
    assert source["slices"]["bad"]["rows"] == 1 and source["slices"]["(missing)"]["token_f1"] == 0.0
    assert (source["worst_slice"], source["best_slice"], source["token_f1_gap"]) == ("(missing)", "good", 1.0)
    assert sum(v["rows"] for v in report["slices"]["length"]["slices"].values()) == 5
    first, worst = report["examples"]["first"], report["examples"]["worst"]
    assert [e["row"] for e in first] == [1, 2, 3, 4, 5] and [e["row"] for e in worst[:2]] == [4, 5]
    assert first[2]["prompt"] == "what is two plus two?" and first[2]["answer"] == said[2]
    assert worst[0]["reference"] == "zebra crossing"
    assert report["edge_cases"]["passed"] == 1 and report["edge_cases"]["by_kind"]["hard"]["passed"] == 0
    assert report["latency"]["requests"] == 2 and report["latency"]["max_tokens"] == 6
    assert report["overlap_with_training"]["measured"] is False  # the tiny experiment is not a complete config
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert written["metrics"] == pytest.approx(m)
    card = evaluation_markdown(report)
    assert "Perplexity" in card and "Answers to 5 conversations: exact 60.0 %, contains 60.0 %, token F1 60.0 %" in card
    assert "Slices by source: worst (missing), best good, token F1 gap 100.0 %." in card
    assert "| good | 3 | 100.0 % | 100.0 % | 100.0 % |" in card and "## Worst answers" in card

    with pytest.raises(ValueError, match="no column 'group'"):
        evaluate_export(chat_export, EvalRequest(data=data, slice_columns=["group"], latency_requests=1), tmp_path)


def test_an_adapter_only_export_loads_on_its_base_model_merged(model, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    from raytune_ft.serve.model import LoadedModel

    base = tmp_path / "base"
    model.save_pretrained(base)
    torch.manual_seed(1)
    tuned = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, weight in tuned.named_parameters():
            if "lora_B" in name:
                weight.normal_()  # B starts at zero (the adapter a no-op): make it change the model
    export = tmp_path / "export"
    tuned.save_pretrained(export)
    tokenizer.save_pretrained(export)
    (export / "raytune_ft.json").write_text(json.dumps(chat_meta(base)))
    assert (export / "adapter_config.json").is_file() and not (export / "config.json").is_file()

    loaded = LoadedModel(export)
    ids = torch.tensor([prompt(tokenizer, user("hi"))])
    with torch.no_grad():
        want = tuned.eval()(input_ids=ids).logits
        got = loaded.model(input_ids=ids).logits
        plain = model.eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)
    assert not hasattr(loaded.model, "peft_config")  # merged: a plain transformers model
    assert loaded.info()["labels"] is None
