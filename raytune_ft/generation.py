"""Greedy answers to chat prompts: one routine for training's evaluation (inside a DeepSpeed engine, ZeRO-3 over
several ranks included), the export check, `raytune-ft eval` and serving, so that every place that scores or
serves an answer produces the same tokens for the same prompt.

Prompts arrive as token ids already rendered with the chat template's generation prompt; this module knows
nothing of templates or configs (torch and transformers only), so any caller can use it without importing the
rest of the package.
"""

from __future__ import annotations

from typing import Any

import torch

# End-of-turn markers of the common chat templates (ChatML, Llama 3, Zephyr/Llama 2): generation stops at any of
# them, as a model fine-tuned on one template may still emit another's marker that its base model learned.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "</s>")


def stop_ids(tokenizer: Any) -> list[int]:
    """The ids generation stops at: the tokenizer's end of sequence, and each end-of-turn marker the tokenizer holds
    as ONE token (a marker spelt in pieces cannot stop generation by id; answer_text cuts it from the text)."""
    vocab = tokenizer.get_vocab()
    found: list[int] = []
    if tokenizer.eos_token_id is not None:
        found.append(int(tokenizer.eos_token_id))
    for marker in END_OF_TURN:
        # get_vocab holds added tokens too; convert_tokens_to_ids would answer the unk id for a missing one
        token_id = vocab.get(marker)
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in found:
            found.append(int(token_id))
    return found


def greedy_answers(
    model: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop: list[int],
    pad_id: int,
    batch_size: int = 16,
    synced: bool = False,
) -> list[list[int]]:
    """For each prompt (token ids), the greedily generated ids up to and excluding the first stop id, in order.

    MODEL is whatever has `.generate`: a PreTrainedModel, a peft PeftModel, a DeepSpeed engine's `.module`. Prompts
    go in batches of BATCH_SIZE in the given order, LEFT padded with an attention mask: generation appends on the
    right, so every row's last real token must sit in the last column, and the model derives position ids from the
    mask, which makes a prompt's answer the same whichever prompts share its batch. SYNCED (ZeRO-3): every rank
    keeps stepping until all are done, because each step gathers sharded weights collectively; the caller makes
    every rank call this with the same number of batches. The model is put in eval mode (no dropout) and given
    back in the mode it had.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if any(not p for p in prompts):
        raise ValueError("an empty prompt: a chat prompt holds at least the generation prompt's tokens")
    if not stop:
        raise ValueError("no stop ids: generation would never end an answer before max_new_tokens")
    device = next(model.parameters()).device
    stop_set = set(stop)
    answers: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                width = max(len(p) for p in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, prompt in enumerate(batch):
                    ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
                    mask[row, width - len(prompt) :] = 1
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=list(stop),
                    pad_token_id=pad_id,
                    synced_gpus=synced,
                )
                for generated in out[:, width:].tolist():
                    # rows that stopped early are filled with pad_id after their stop id: cut at the first stop
                    end = next((k for k, token in enumerate(generated) if token in stop_set), len(generated))
                    answers.append(generated[:end])
    finally:
        model.train(was_training)
    return answers


def answer_text(tokenizer: Any, ids: list[int]) -> str:
    """The answer's text: decoded without special tokens, cut at the first end-of-turn marker written out in the
    text (a tokenizer without the marker as one token spells it in pieces, which decoding keeps), stripped."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    markers = [*END_OF_TURN[:2], getattr(tokenizer, "eos_token", None)]
    cuts = [text.find(m) for m in markers if m and m in text]
    if cuts:
        text = text[: min(cuts)]
    return text.strip()
