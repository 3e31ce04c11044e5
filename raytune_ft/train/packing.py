"""Packing for chat and instruction fine-tuning: several short conversations share one row of up to
`data.block_size` tokens, and attention never crosses from one conversation into another.

Pure functions; train/batches.py packs a chat run's training split with `packed_columns` (data.chat.packing) and
collates its rows with `collate_packed`:

* `pack(examples, block_size)` puts tokenized examples (input_ids, labels with -100 where no loss) into rows by
  best-fit decreasing, restarts the position ids at 0 for each example and sets the label of each example's first
  token to -100 (see `pack`); `plan_rows` is its row assignment alone, on lengths.
* `collate_packed(rows, pad_id, attention)` turns rows into the keyword arguments of a Hugging Face causal LM:
  - "block": a 4D additive attention mask (batch, 1, seq, seq), causal within each example and blocked across
    examples and padding, plus the restarted position ids. transformers (masking_utils._preprocess_mask_arguments)
    hands a 4D mask to the attention as-is, whatever the cache; `eager` adds it to the scores and `sdpa` passes it
    to torch as a float mask. The CPU path: explicit, so it cannot silently turn into plain causal attention.
  - "position_ids": no mask at all; transformers finds the packed sequences from position ids that restart
    (masking_utils.find_packed_sequence_indices) and builds the block-diagonal mask itself, for eager and sdpa.
    It does so only when no 2D mask is given and the model holds no cache, and LlamaModel builds a DynamicCache
    whenever use_cache is on (the config's default, in training too), in which case the rows silently attend
    across examples. So the batch carries use_cache=False. The batch holds no mask; transformers builds the same
    one inside each forward.
  - "varlen": the padding-free layout of transformers' DataCollatorWithFlattening: every row's tokens in one
    (1, total) sequence, position ids restarting per example, and cu_seq_lens_q/k (int32) with max_length_q/k
    (ints), which flash_attention_2/3 hands to flash_attn_varlen_func (modeling_flash_attention_utils). GPU only.
* `check_supports_packing(model, attention)` refuses a model or attention implementation that would not keep
  the examples apart, with a message saying what to change.
* `fill_ratio` / `compare_fill`: tokens / (rows x block_size), packed against one example per row.

A batch holds values that are not tensors (use_cache, and max_length_q/k for "varlen"): whoever moves it to a
device moves the tensors only.
"""

from __future__ import annotations

import inspect
import sys
from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from raytune_ft.errors import RaytuneFtError

IGNORE_INDEX = -100  # the label of a token with no loss, as the chat masking and torch's cross_entropy use it

Attention = Literal["block", "position_ids", "varlen"]
ATTENTION_MODES: tuple[str, ...] = ("block", "position_ids", "varlen")

# Attention implementations each mode was checked against (transformers 5.x, masking_utils and the flash path).
# flex_attention is left out of "block": it wants a BlockMask, not a dense 4D tensor.
_IMPLEMENTATIONS = {
    "block": ("eager", "sdpa"),
    "position_ids": ("eager", "sdpa"),
}


class PackingError(RaytuneFtError, ValueError):
    """An example that cannot be packed (too long, empty, labels not matching), or a model that cannot take packed
    rows."""


@dataclass
class PackedRow:
    """One row of up to block_size tokens holding whole examples, in the order of `example_ids`."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)  # tokens of each example in the row
    example_ids: list[int] = field(default_factory=list)  # each example's index in pack()'s input

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def cu_seqlens(self) -> list[int]:
        """Where each example starts in the row, and the row's end: [0, l0, l0+l1, ...]."""
        out = [0]
        for n in self.seq_lens:
            out.append(out[-1] + n)
        return out


def _ids_and_labels(example: Any) -> tuple[Sequence[int], Sequence[int]]:
    if isinstance(example, Mapping):
        return example["input_ids"], example["labels"]
    input_ids, labels = example
    return input_ids, labels


def plan_rows(lengths: Sequence[int], block_size: int) -> list[list[int]]:
    """Which examples (indices into `lengths`) share each row, by best-fit decreasing (see `pack`); each
    length must be between 1 and block_size."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    members: list[list[int]] = []  # example indices of each row
    # The rows with room left, by how much room: rooms[r] the rows with r free tokens (last in, first used), and
    # sizes the sorted values of r that have rows. At most block_size values, however many rows.
    rooms: dict[int, list[int]] = {}
    sizes: list[int] = []
    for i in order:
        n = lengths[i]
        k = bisect_left(sizes, n)  # the least room that still fits n tokens
        if k == len(sizes):
            row = len(members)
            members.append([i])
            room = block_size - n
        else:
            room = sizes[k]
            row = rooms[room].pop()
            if not rooms[room]:
                del rooms[room], sizes[k]
            members[row].append(i)
            room -= n
        if room > 0:
            if room not in rooms:
                rooms[room] = []
                insort(sizes, room)
            rooms[room].append(row)
    return [sorted(ids) for ids in members]


def pack(examples: Iterable[Any], block_size: int) -> list[PackedRow]:
    """Pack `examples` into rows of at most `block_size` tokens.

    An example is an (input_ids, labels) pair or a mapping with those keys, labels -100 where there is no loss.
    An example longer than block_size is an error naming it: truncating happens earlier, in the data step, where
    it can be reported; here it would cut an answer short without a word. An empty one is an error too.

    Best-fit decreasing: the examples, longest first, each go into the fullest row that still has room (a new row
    when none has). Like first-fit decreasing it needs at most 11/9 of the optimal number of rows plus one, and
    bisecting the sorted sizes of the rows' free space finds that row in O(log block_size), so a million examples
    are placed in about ten seconds. First-fit in input order would keep the order but usually leave more of each
    row empty. The order is lost anyway: rows come out roughly by the length of their longest example, so the
    caller shuffles rows (as it shuffles examples). Within a row the examples keep their input order, and ties in
    length go by input order, so the result is deterministic.

    Each example's position ids restart at 0, and the label of its first token becomes -100: a causal LM's loss
    shifts the labels by one (the logits at t predict the label at t+1, transformers' ForCausalLMLoss), so without
    it the last token of one example would be trained to predict the first token of the next. Unpacked, the first
    label is never a target, so nothing is lost.
    """
    if block_size < 1:
        raise PackingError(f"block_size must be positive, got {block_size}")
    items: list[tuple[list[int], list[int]]] = []
    for i, example in enumerate(examples):
        input_ids, labels = _ids_and_labels(example)
        input_ids, labels = list(input_ids), list(labels)
        if len(input_ids) != len(labels):
            raise PackingError(f"example {i} has {len(input_ids)} input ids but {len(labels)} labels")
        if not input_ids:
            raise PackingError(f"example {i} is empty; the data step should drop it")
        if len(input_ids) > block_size:
            raise PackingError(
                f"example {i} has {len(input_ids)} tokens, more than data.block_size={block_size}; "
                "truncate or drop it in the data step, before packing"
            )
        items.append((input_ids, labels))

    members = plan_rows([len(input_ids) for input_ids, _ in items], block_size)
    rows = []
    for ids in members:
        row = PackedRow()
        for i in ids:
            input_ids, labels = items[i]
            row.input_ids += input_ids
            row.labels += [IGNORE_INDEX, *labels[1:]]
            row.position_ids += range(len(input_ids))
            row.seq_lens.append(len(input_ids))
            row.example_ids.append(i)
        rows.append(row)
    return rows


def packed_columns(input_ids: list[list[int]], labels: list[list[int]], block_size: int, seed: int) -> dict[str, list]:
    """A training split's examples shuffled with SEED (pack() sorts them by length, so which examples share a row
    would otherwise follow the file) and packed, as columns that travel through Ray's object store: input_ids,
    labels, position_ids and seq_lens per row. The examples per row are fixed for the run; the rows are shuffled
    every epoch like any rows."""
    import random

    order = list(range(len(input_ids)))
    random.Random(seed).shuffle(order)
    rows = pack([(input_ids[i], labels[i]) for i in order], block_size)
    return {
        "input_ids": [r.input_ids for r in rows],
        "labels": [r.labels for r in rows],
        "position_ids": [r.position_ids for r in rows],
        "seq_lens": [r.seq_lens for r in rows],
    }


def block_attention_mask(
    seq_lens: Sequence[Sequence[int]], length: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The additive mask (batch, 1, length, length): 0 where a query may attend to a key, the dtype's minimum
    elsewhere. Causal within each example, nothing across examples. The padding after a row's examples is one more
    causal segment: every query row then has a key it may see, so the softmax never sees a fully masked row (which
    gives NaN in sdpa and would reach the real tokens through 0 x NaN), and no real token sees the padding."""
    batch = len(seq_lens)
    segment = torch.empty(batch, length, dtype=torch.long)
    for b, lens in enumerate(seq_lens):
        ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(list(lens), dtype=torch.long))
        segment[b, : len(ids)] = ids
        segment[b, len(ids) :] = len(lens)  # padding: a segment of its own
    same = segment[:, :, None] == segment[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (same & causal)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def collate_packed(
    rows: Sequence[PackedRow],
    pad_id: int,
    attention: Attention = "block",
    *,
    pad_to: int | None = None,
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """A batch of packed rows as the keyword arguments of a Hugging Face causal LM (`model(**batch)`).

    "block" and "position_ids": input_ids, labels and position_ids of shape (len(rows), length), length the
    longest row or `pad_to`; padding is `pad_id` with label -100 and position ids restarting at 0, so the padding is
    a segment of its own that no real token attends to. "block" adds `attention_mask`, the 4D additive mask of
    `block_attention_mask` in `mask_dtype` (the model's dtype: sdpa wants a float mask of the query's dtype).

    "varlen": all rows' tokens in one unpadded (1, total) sequence, as transformers' DataCollatorWithFlattening
    returns it, with cu_seq_lens_q/k (int32, the example boundaries) and max_length_q/k (ints) for the
    flash-attention varlen kernel; pad_id and pad_to are unused. Its labels need no separator: pack() already set
    each example's first label to -100.

    Every mode carries use_cache=False: a packed batch is never a generation prefix, and the "position_ids" mode is
    only detected by transformers when the model holds no cache.
    """
    if attention not in ATTENTION_MODES:
        raise PackingError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    if not rows:
        raise PackingError("no rows to collate")

    if attention == "varlen":
        input_ids, labels, position_ids, lens = [], [], [], []
        for row in rows:
            input_ids += row.input_ids
            labels += row.labels
            position_ids += row.position_ids
            lens += row.seq_lens
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max(lens),
            "max_length_k": max(lens),
            "use_cache": False,
        }

    longest = max(row.num_tokens for row in rows)
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise PackingError(f"pad_to={pad_to} is shorter than the longest row ({longest} tokens)")
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.empty((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        n = row.num_tokens
        input_ids[b, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(row.labels, dtype=torch.long)
        position_ids[b, :n] = torch.tensor(row.position_ids, dtype=torch.long)
        position_ids[b, n:] = torch.arange(length - n)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "use_cache": False,
    }
    if attention == "block":
        batch["attention_mask"] = block_attention_mask([row.seq_lens for row in rows], length, mask_dtype)
    return batch


def check_supports_packing(model: torch.nn.Module, attention: Attention = "block") -> None:
    """Raise PackingError unless `model` keeps packed examples apart with `attention`.

    The model's forward must take position_ids (so each example's positions restart) and pass keyword arguments
    down to its attention (the varlen kwargs travel that way), and its modeling module must build its mask with
    transformers' masking_utils (create_causal_mask), which takes a 4D mask as-is and finds packed sequences from
    position ids; models written before that (their own mask code) may drop or rebuild the mask. Then the
    attention implementation must be one the mode works with: eager or sdpa for "block" and "position_ids",
    a flash-attention one for "varlen" (sdpa and eager ignore cu_seq_lens and would attend across examples)."""
    if attention not in ATTENTION_MODES:
        raise PackingError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    name = type(model).__name__
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params:
        raise PackingError(
            f"{name} takes no position_ids, so packed examples cannot restart their positions; "
            "packing needs a model family that does (Llama, Mistral, Qwen2, GPT-2, ...)"
        )
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise PackingError(f"{name}.forward takes no **kwargs, so it cannot pass attention arguments down")
    base = getattr(model, "base_model", model)
    module = sys.modules.get(type(base).__module__)
    if module is None or not hasattr(module, "create_causal_mask"):
        raise PackingError(
            f"{name} does not build its attention mask with transformers.masking_utils.create_causal_mask, "
            "so a packed batch's mask may be dropped or rebuilt; packing needs a model family that uses it"
        )
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if attention == "varlen":
        if "flash" not in impl:
            raise PackingError(
                f"attention='varlen' needs a flash-attention implementation (attn_implementation="
                f"'flash_attention_2'), {name} uses {impl!r}, which ignores cu_seq_lens and would attend across "
                "examples; use attention='block' there"
            )
    elif impl not in _IMPLEMENTATIONS[attention]:
        hint = "; use attention='varlen' with flash attention" if "flash" in impl else ""
        raise PackingError(
            f"attention={attention!r} works with the {' and '.join(_IMPLEMENTATIONS[attention])} attention "
            f"implementations, {name} uses {impl!r}{hint}"
        )


def fill_ratio(row_tokens: Iterable[int], block_size: int) -> float:
    """Real tokens / (rows x block_size): the share of a block_size-wide batch that is not padding."""
    tokens = list(row_tokens)
    return sum(tokens) / (len(tokens) * block_size) if tokens else 0.0


def compare_fill(example_lengths: Sequence[int], block_size: int) -> dict[str, float | int]:
    """Packed against padded (one example per row, padded to block_size) for `bench train` to report."""
    too_long = [i for i, n in enumerate(example_lengths) if not 0 < n <= block_size]
    if too_long:
        i = too_long[0]
        raise PackingError(f"example {i} has {example_lengths[i]} tokens, not between 1 and {block_size}")
    rows = plan_rows(example_lengths, block_size)
    return {
        "examples": len(example_lengths),
        "tokens": sum(example_lengths),
        "rows_packed": len(rows),
        "rows_padded": len(example_lengths),
        "fill_packed": fill_ratio((sum(example_lengths[i] for i in ids) for ids in rows), block_size),
        "fill_padded": fill_ratio(example_lengths, block_size),
    }
