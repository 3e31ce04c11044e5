"""Deterministic batching: which rows every worker reads at every optimizer step.

A step's global batch is a contiguous slice of a seeded per-epoch permutation, cut into one micro-batch per
worker and accumulation step. So the same rows make up step s whatever the number of workers (1 worker x 8 rows
and 2 workers x 4 rows train on the same 8), and a resumed run re-reads exactly the rows it would have read.

With `lengths` (train.group_by_length), each run of GROUP_BATCHES global batches of the permutation is sorted by
length before it is cut into batches, and the batches are then shuffled: rows of similar length share a batch, so
little of a batch is padding (short texts with a long tail, like SST-2, pad to a few times their length otherwise),
while which rows meet and the order of batches stay random.

With `extra` (train.whole_repeats), those row indices join every epoch's pool once more each: the rows a model
meets whole at serving time (for SST-2, the full sentences among their own phrases) are read more often.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raytune_ft.data.tokenize import tokenize_causal_blocks, tokenize_classification

IGNORE_INDEX = -100  # a token with no loss (PyTorch's cross-entropy default)
GROUP_BATCHES = 50  # global batches sorted together by train.group_by_length


@dataclass(frozen=True)
class StepPlan:
    n_train: int
    micro_batch: int
    world_size: int
    grad_accum: int
    epochs: int
    max_steps: int | None
    seed: int
    lengths: tuple[int, ...] | None = None
    extra: tuple[int, ...] = ()

    @property
    def pool(self) -> int:
        """Rows read per epoch: every training row once, plus `extra`."""
        return self.n_train + len(self.extra)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.pool // self.global_batch

    @property
    def total_steps(self) -> int:
        steps = self.epochs * self.steps_per_epoch
        return min(steps, self.max_steps) if self.max_steps else steps

    @classmethod
    def of(cls, cfg: Any, train: dict[str, list], world_size: int, grad_accum: int | None = None) -> StepPlan:
        """The plan of an experiment's training split (`cfg` an ExperimentConfig) on `world_size` workers."""
        t = cfg.train
        whole = train.get("whole") or []
        return cls(
            n_train=len(train["input_ids"]),
            micro_batch=t.batch_size,
            world_size=world_size,
            grad_accum=t.grad_accum if grad_accum is None else grad_accum,
            epochs=t.epochs,
            max_steps=t.max_steps,
            seed=cfg.seed,
            lengths=tuple(len(ids) for ids in train["input_ids"]) if t.group_by_length else None,
            extra=tuple(i for i, w in enumerate(whole) if w) * (t.whole_repeats - 1),
        )

    def check(self) -> None:
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training split has {self.n_train} rows, fewer than one global batch of {self.global_batch} "
                f"(train.batch_size {self.micro_batch} x {self.world_size} workers x train.grad_accum "
                f"{self.grad_accum}); lower them or add data"
            )

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.pool, generator=generator)
        if self.extra:
            perm = torch.cat([torch.arange(self.n_train), torch.tensor(self.extra, dtype=torch.long)])[perm]
        if self.lengths is None:
            return perm
        batches = self.steps_per_epoch
        used = batches * self.global_batch  # the rest (fewer rows than a batch) is left out of this epoch
        lengths = torch.tensor(self.lengths)
        group = GROUP_BATCHES * self.global_batch
        grouped = torch.cat([chunk[torch.argsort(lengths[chunk], stable=True)] for chunk in perm[:used].split(group)])
        order = torch.randperm(batches, generator=generator)
        return torch.cat([grouped.view(batches, self.global_batch)[order].reshape(-1), perm[used:]])

    def micro_batches(self, step: int, rank: int, perm: torch.Tensor | None = None) -> list[list[int]]:
        """Row indices of each micro-batch this rank runs for optimizer step `step` (0-based)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch) if perm is None else perm
        base = offset * self.global_batch
        out = []
        for k in range(self.grad_accum):
            start = base + (k * self.world_size + rank) * self.micro_batch
            out.append(perm[start : start + self.micro_batch].tolist())
        return out


def tokenize_splits(
    tables: dict[str, Any],
    tokenizer: Any,
    task: str,
    max_length: int,
    block_size: int,
    chat: Any = None,
    seed: int = 0,
) -> dict[str, dict[str, list]]:
    """Token ids per split, small enough to ship to every worker through Ray's object store. CHAT (data.chat) is
    needed for task "chat": labels on the answers, and for every split but train the generation prompts and
    references; with chat.packing the training split is packed into block_size rows (shuffled with SEED first)."""
    out = {}
    for name, table in tables.items():
        if task == "chat":
            from raytune_ft.data.chat import tokenize_chat_table

            out[name] = tokenize_chat_table(table, tokenizer, chat, block_size, prompts=name != "train")[0]
            if name == "train" and chat.packing:
                from raytune_ft.train.packing import packed_columns

                out[name] = packed_columns(out[name]["input_ids"], out[name]["labels"], block_size, seed)
            continue
        texts = table.column("text").to_pylist()
        if task == "causal-lm":
            enc = tokenize_causal_blocks(texts, tokenizer, block_size)
            out[name] = {"input_ids": enc["input_ids"]}
        else:
            enc = tokenize_classification(texts, table.column("label_id").to_pylist(), tokenizer, max_length)
            out[name] = {"input_ids": enc["input_ids"], "labels": enc["labels"]}
            if "slice" in table.column_names:
                out[name]["slices"] = table.column("slice").to_pylist()
            if "whole" in table.column_names:
                out[name]["whole"] = table.column("whole").to_pylist()
    return out


def collate(
    split: dict[str, list],
    rows: list[int],
    pad_id: int,
    device: torch.device,
    attention: str = "block",
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The model's keyword arguments for ROWS, plus `labels`. Plain rows are padded to the longest of the
    micro-batch (right padding, masked); chat labels are padded with -100. Packed rows (a split with seq_lens) go
    through packing.collate_packed with ATTENTION ("block" on CPU, "varlen" with flash attention) and a mask in
    MASK_DTYPE, the model's. Only tensors are moved to DEVICE."""
    if "seq_lens" in split:
        from raytune_ft.train.packing import PackedRow, collate_packed

        packed = [
            PackedRow(split["input_ids"][i], split["labels"][i], split["position_ids"][i], split["seq_lens"][i])
            for i in rows
        ]
        batch = collate_packed(packed, pad_id, attention, mask_dtype=mask_dtype)  # type: ignore[arg-type]
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    ids = [split["input_ids"][i] for i in rows]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for j, row in enumerate(ids):
        input_ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[j, : len(row)] = 1
    batch = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    if "labels" in split and is_token_labels(split):
        labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        for j, i in enumerate(rows):
            labels[j, : len(split["labels"][i])] = torch.tensor(split["labels"][i], dtype=torch.long)
        batch["labels"] = labels.to(device)
    elif "labels" in split:
        batch["labels"] = torch.tensor([split["labels"][i] for i in rows], dtype=torch.long, device=device)
    return batch


def is_token_labels(split: dict[str, list]) -> bool:
    """Chat rows carry a label per token (IGNORE_INDEX where nothing is learned); classification rows one class."""
    return bool(split.get("labels")) and isinstance(split["labels"][0], list)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What the model's forward takes: the batch without its labels (the losses here are computed outside)."""
    return {k: v for k, v in batch.items() if k != "labels"}
