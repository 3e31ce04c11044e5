"""Gradual unfreezing (ULMFiT style) as a pure function of (group label, optimizer step).

Definition. `step` is the 0-based index of the optimizer step about to run, i.e. the number of optimizer steps
already taken (the counter the LR scheduler uses). Ranking the groups top-down as head (rank 0), layer.<L-1>
(rank 1), ..., layer.0 (rank L), embeddings (rank L + 1), and with s = min(start_trainable_layers, L) and
e = every_steps, the group of rank k is trainable from step e * max(0, k - s) on. So the head and the top s
blocks train from step 0, each further block down joins e steps after the one above it, and the embeddings
join e steps after layer.0.

Example, L = 2, s = 0, e = 3: head from step 0, layer.1 from step 3, layer.0 from step 6, embeddings from
step 9. The first update that moves layer.1 is the 4th optimizer step (index 3).

The training loop multiplies each optimizer group's LR by the gate, so a gated group gets lr 0 and AdamW leaves
it bit-identical (decoupled weight decay is scaled by lr too). Being a pure function of the step, a resumed run
gates exactly as the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable

from raytune_ft.config.schema import GradualUnfreezeConfig


def unfreeze_schedule(gradual: GradualUnfreezeConfig | None, num_layers: int) -> list[tuple[int, str]]:
    """(first trainable step, group label) for every group, top-down; all at step 0 without gradual unfreezing."""
    top_down = ["head", *(f"layer.{i}" for i in reversed(range(num_layers))), "embeddings"]
    if gradual is None:
        return [(0, label) for label in top_down]
    start = min(gradual.start_trainable_layers, num_layers)
    return [(gradual.every_steps * max(0, rank - start), label) for rank, label in enumerate(top_down)]


def unfreeze_gate(gradual: GradualUnfreezeConfig | None, num_layers: int) -> Callable[[str, int], float]:
    """gate(group_label, step) -> 1.0 when the group trains at that optimizer step, else 0.0."""
    if gradual is None:
        return lambda label, step: 1.0
    first_step = {label: step for step, label in unfreeze_schedule(gradual, num_layers)}

    def gate(label: str, step: int) -> float:
        if label not in first_step:
            raise ValueError(f"unknown layer group '{label}' (known: {', '.join(first_step)})")
        return 1.0 if step >= first_step[label] else 0.0

    return gate
