"""Packing (raytune_ft.train.packing): rows of whole examples whose attention never crosses an example.

The equivalence tests run tiny fp32 models (Llama and GPT-2, eager and sdpa) on packed rows and on each example
alone, unpadded: the per-token logits and the loss over answer tokens must agree within 1e-5, and they must not
agree when the packed rows are run with plain causal attention (so the test can fail). The varlen (flash-attention)
layout cannot run here; its batch is checked against transformers' DataCollatorWithFlattening and its
cu_seq_lens are run through a pure-torch varlen attention registered under a test name.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
import torch.nn.functional as F
from tiny_models import llama_config
from torch import nn
from transformers import DataCollatorWithFlattening, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from raytune_ft.train.packing import (
    IGNORE_INDEX,
    PackingError,
    block_attention_mask,
    check_supports_packing,
    collate_packed,
    compare_fill,
    fill_ratio,
    pack,
    plan_rows,
)

VOCAB = 100
BLOCK = 24
PAD = 0


def tiny_model(family: str, attn: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        # 4 query heads over 2 key/value heads, so grouped-query attention is on the path too
        config = llama_config(VOCAB, num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=3, eos_token_id=3
        )
        config._attn_implementation = attn
        model = GPT2LMHeadModel(config)
    return model.eval()  # GPT-2's dropout off


def chat_examples(n: int = 9, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Prompt-then-answer examples of 2 to 12 tokens: the prompt's labels -100, the answer's its own ids."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(2, 12)
        ids = [rng.randrange(1, VOCAB) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def reference(model: nn.Module, examples) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Each example run alone, unpadded: its logits, and the summed loss and count of its answer tokens."""
    logits, total, count = [], torch.zeros(()), 0
    with torch.no_grad():
        for ids, labels in examples:
            out = model(torch.tensor([ids])).logits[0]
            targets = torch.tensor(labels[1:])
            total = total + F.cross_entropy(out[:-1], targets, ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((targets != IGNORE_INDEX).sum())
            logits.append(out)
    return logits, total, count


@functools.cache
def unpacked(family: str, attn: str) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """`reference` of chat_examples() on tiny_model(family, attn), once per session (its tests share it)."""
    return reference(tiny_model(family, attn), chat_examples())


def packed_logits(logits: torch.Tensor, rows) -> dict[int, torch.Tensor]:
    """Each example's slice of a (rows, length, vocab) output, by example id."""
    out = {}
    for b, row in enumerate(rows):
        starts = row.cu_seqlens
        for j, i in enumerate(row.example_ids):
            out[i] = logits[b, starts[j] : starts[j + 1]]
    return out


# --- pack ---------------------------------------------------------------------------------------------------


def test_pack_best_fit_decreasing_rows():
    lengths = [5, 3, 8, 2, 6, 4]
    examples = [(list(range(10 * i, 10 * i + n)), list(range(10 * i, 10 * i + n))) for i, n in enumerate(lengths)]
    rows = pack(examples, block_size=10)
    # 8 opens row 0, 6 row 1, 5 row 2; 4 goes to the fullest row it fits (row 1), 3 to row 2, 2 to a row with
    # 2 free (the newest such, row 2)
    assert [r.example_ids for r in rows] == [[2], [4, 5], [0, 1, 3]]
    assert [r.seq_lens for r in rows] == [[8], [6, 4], [5, 3, 2]]
    assert plan_rows(lengths, 10) == [[2], [4, 5], [0, 1, 3]]
    row = rows[2]
    assert row.input_ids == [0, 1, 2, 3, 4, 10, 11, 12, 30, 31]
    assert row.position_ids == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert row.cu_seqlens == [0, 5, 8, 10]
    # each example's first label is -100: no example's first token is predicted from the one before it
    assert row.labels == [-100, 1, 2, 3, 4, -100, 11, 12, -100, 31]


def test_pack_random_lengths_places_every_example_once_within_block():
    rng = random.Random(1)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    rows = pack([([7] * n, [7] * n) for n in lengths], block_size=64)
    assert sorted(i for r in rows for i in r.example_ids) == list(range(500))
    assert all(r.num_tokens <= 64 and r.num_tokens == sum(r.seq_lens) for r in rows)
    assert all(r.seq_lens == [lengths[i] for i in r.example_ids] for r in rows)
    assert len(rows) <= sum(lengths) * 11 / 9 / 64 + 1  # FFD/BFD's bound on the optimum's lower bound
    assert pack([([7] * n, [7] * n) for n in lengths], block_size=64) == rows  # deterministic


def test_pack_takes_mappings():
    rows = pack([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 8)
    assert rows[0].input_ids == [5, 6, 7, 8] and rows[0].labels == [-100, 6, 7, -100]


def test_pack_errors_name_the_example():
    good = ([1, 2], [1, 2])
    with pytest.raises(PackingError, match=r"example 2 has 11 tokens, more than data.block_size=10"):
        pack([good, good, ([1] * 11, [1] * 11)], block_size=10)
    with pytest.raises(PackingError, match="example 1 is empty"):
        pack([good, ([], [])], block_size=10)
    with pytest.raises(PackingError, match="example 0 has 2 input ids but 1 labels"):
        pack([([1, 2], [1])], block_size=10)
    with pytest.raises(ValueError, match="block_size must be positive"):  # PackingError is a ValueError too
        pack([good], block_size=0)


def test_fill_ratio_and_compare_fill():
    assert fill_ratio([10, 5], 10) == 0.75
    assert fill_ratio([], 10) == 0.0
    fill = compare_fill([5, 3, 8, 2, 6, 4], 10)
    assert fill == {
        "examples": 6,
        "tokens": 28,
        "rows_packed": 3,
        "rows_padded": 6,
        "fill_packed": 28 / 30,
        "fill_padded": 28 / 60,
    }
    with pytest.raises(PackingError, match="example 1 has 11 tokens"):
        compare_fill([3, 11], 10)


# --- collate ------------------------------------------------------------------------------------------------


def test_collate_pads_as_a_segment_of_its_own():
    rows = pack([([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [6, 7, 8, 9])], block_size=5)
    assert [r.seq_lens for r in rows] == [[4], [3, 2]]
    batch = collate_packed(rows, pad_id=PAD, attention="block", pad_to=6)
    assert batch["input_ids"].tolist() == [[6, 7, 8, 9, 0, 0], [1, 2, 3, 4, 5, 0]]
    assert batch["labels"].tolist() == [[-100, 7, 8, 9, -100, -100], [-100, 2, 3, -100, 5, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 0]]
    assert batch["use_cache"] is False
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.float32
    allowed = (mask == 0).int()[:, 0].tolist()
    assert allowed[1] == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees itself only, so no query row is fully masked
    ]
    assert (mask[mask != 0] == torch.finfo(torch.float32).min).all()
    # without pad_to, the longest row; "position_ids" is the same batch without the mask
    plain = collate_packed(rows, pad_id=PAD, attention="position_ids")
    assert plain["input_ids"].shape == (2, 5) and "attention_mask" not in plain
    assert block_attention_mask([[2]], 2, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(PackingError, match="pad_to=4 is shorter than the longest row"):
        collate_packed(rows, pad_id=PAD, pad_to=4)
    with pytest.raises(PackingError, match="attention must be one of"):
        collate_packed(rows, pad_id=PAD, attention="flash")


def test_collate_varlen_matches_data_collator_with_flattening():
    examples = chat_examples()
    rows = pack(examples, BLOCK)
    batch = collate_packed(rows, pad_id=PAD, attention="varlen")
    in_order = [examples[i] for r in rows for i in r.example_ids]
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": ids, "labels": labels} for ids, labels in in_order]
    )
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == theirs[key].dtype, key
        assert batch[key].tolist() == theirs[key].tolist(), key
    assert (
        batch["max_length_q"] == batch["max_length_k"] == theirs["max_length_q"] == max(len(ids) for ids, _ in examples)
    )
    # and what the flash path would infer from the position ids alone
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_q.tolist() == batch["cu_seq_lens_q"].tolist() and int(max_q) == batch["max_length_q"]
    assert batch["input_ids"].shape == (1, sum(len(ids) for ids, _ in examples))


# --- the model sees the same thing ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("attention", ["block", "position_ids"])
def test_packed_equals_unpacked(family, attn, attention):
    model = tiny_model(family, attn)
    check_supports_packing(model, attention)
    examples = chat_examples()
    rows = pack(examples, BLOCK)
    assert len(rows) < len(examples) and any(len(r.example_ids) > 2 for r in rows)
    ref_logits, ref_sum, ref_count = unpacked(family, attn)

    batch = collate_packed(rows, pad_id=PAD, attention=attention, pad_to=BLOCK)
    with torch.no_grad():
        out = model(**batch)
    # the model's own loss: mean over the shifted labels that are not -100, the same tokens as unpacked
    shifted = batch["labels"][:, 1:]
    assert int((shifted != IGNORE_INDEX).sum()) == ref_count
    assert abs(out.loss.item() - (ref_sum / ref_count).item()) < 1e-5
    for i, logits in packed_logits(out.logits, rows).items():
        torch.testing.assert_close(logits, ref_logits[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_rows_without_separation_differ(family):
    """Plain causal attention over the packed rows (no mask, positions 0..n), and the position_ids mode with the
    model's cache on (transformers then skips its packed-sequence detection): later examples see earlier ones."""
    model = tiny_model(family, "sdpa")
    examples = chat_examples()
    rows = pack(examples, BLOCK)
    ref_logits, ref_sum, ref_count = unpacked(family, "sdpa")
    batch = collate_packed(rows, pad_id=PAD, attention="block", pad_to=BLOCK)
    later = [i for r in rows for i in r.example_ids[1:]]
    with torch.no_grad():
        causal = model(input_ids=batch["input_ids"], labels=batch["labels"])
        cached = model(**{**collate_packed(rows, pad_id=PAD, attention="position_ids"), "use_cache": True})
    for out in (causal, cached):
        got = packed_logits(out.logits, rows)
        assert min((got[i] - ref_logits[i]).abs().max().item() for i in later) > 1e-3
    assert abs(causal.loss.item() - (ref_sum / ref_count).item()) > 1e-4


def _reference_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash_attn_varlen_func's contract in plain torch: causal attention within each [cu[j], cu[j+1]) of the
    flattened sequence. Stands in for flash_attention_2, which this machine cannot run."""
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    assert attention_mask is None and query.shape[0] == 1 and torch.equal(cu, kwargs["cu_seq_lens_k"])
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.empty_like(query)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        assert end - start <= longest
        s = slice(start, end)
        out[:, :, s] = F.scaled_dot_product_attention(
            query[:, :, s], key[:, :, s], value[:, :, s], is_causal=True, scale=scaling
        )
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture
def reference_varlen():
    name = "packing_test_varlen"
    ALL_ATTENTION_FUNCTIONS[name] = _reference_varlen_attention  # this instance only, removed after
    yield name
    del ALL_ATTENTION_FUNCTIONS[name]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_varlen_kwargs_reach_the_attention_and_keep_examples_apart(family, reference_varlen):
    model = tiny_model(family, "sdpa")
    examples = chat_examples()
    rows = pack(examples, BLOCK)
    ref_logits, ref_sum, ref_count = unpacked(family, "sdpa")
    model.config._attn_implementation = reference_varlen
    batch = collate_packed(rows, pad_id=PAD, attention="varlen")
    with torch.no_grad():
        out = model(**batch)
    assert abs(out.loss.item() - (ref_sum / ref_count).item()) < 1e-5
    start = 0
    for i in (i for r in rows for i in r.example_ids):
        n = len(examples[i][0])
        torch.testing.assert_close(out.logits[0, start : start + n], ref_logits[i], atol=1e-5, rtol=0)
        start += n


# --- which models can take packed rows ----------------------------------------------------------------------


def test_check_supports_packing():
    llama = tiny_model("llama", "sdpa")
    check_supports_packing(llama, "block")
    check_supports_packing(llama, "position_ids")
    with pytest.raises(PackingError, match="needs a flash-attention implementation"):
        check_supports_packing(llama, "varlen")
    llama.config._attn_implementation = "flash_attention_2"  # not run, only looked at
    check_supports_packing(llama, "varlen")
    with pytest.raises(PackingError, match="use attention='varlen' with flash attention"):
        check_supports_packing(llama, "block")
    llama.config._attn_implementation = "flex_attention"
    with pytest.raises(PackingError, match="works with the eager and sdpa"):
        check_supports_packing(llama, "block")

    class NoPositions(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    with pytest.raises(PackingError, match="takes no position_ids"):
        check_supports_packing(NoPositions())

    class OwnMask(nn.Module):  # takes position ids but builds its mask without masking_utils
        def forward(self, input_ids, position_ids=None, **kwargs):
            return input_ids

    with pytest.raises(PackingError, match="does not build its attention mask with"):
        check_supports_packing(OwnMask())
