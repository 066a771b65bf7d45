"""Packed batches (data.packing = true), decided once for both backends: causal examples are placed into rows of
one fixed width, so every batch has the same shape (one compiled graph on MLX, a predictable peak) and almost no
position is padding.

Exactness: each example is shifted on its own (its last token predicts nothing across the boundary), and the
attention of a row is block-diagonal causal: a position sees only the earlier positions of its own example. The
row's positions run on (0 … width-1) rather than restarting per example: RoPE scores depend only on the distance
between query and key, which within one example is the same packed or unpacked, so each example's logits and loss
are its unpacked ones up to float rounding (tests/test_packing.py: 1e-5). Families with absolute position
embeddings cannot be packed this way, and trmlx.loop.require_packable refuses them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from trmlx.data.examples import Example, bucket_batches, collate, round_up, with_loss_rows


def pack_rows(positions: Sequence[int], width: int) -> list[tuple[int, ...]]:
    """Example indices per row, best-fit decreasing: longest example first, each into the row whose free space it
    fills best (a new row if none has room). Deterministic, so a resumed run packs exactly as the first did.
    positions: per example, the positions it fills (its token count - 1, after the shift)."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: the best fit is the first with enough room
    for i in sorted(range(len(positions)), key=lambda i: (-positions[i], i)):
        need = positions[i]
        if need > width:
            raise ValueError(f"example {i} fills {need} positions, more than the row width {width}")
        slot = bisect.bisect_left(free, (need, -1))
        if slot == len(free):
            rows.append([i])
            space, row = width - need, len(rows) - 1
        else:
            space, row = free.pop(slot)
            rows[row].append(i)
            space -= need
        bisect.insort(free, (space, row))
    return [tuple(r) for r in rows]


def collate_rows(groups: Sequence[Sequence[Example]], width: int, pad_id: int) -> dict[str, np.ndarray]:
    """One packed row per group of examples: inputs, targets and loss mask as collate_causal builds them, plus
    `attend` (rows, 1, width, width), True where query position i may see key position j: j ≤ i in the same
    example. Padding positions form one more block of their own, so no softmax row is empty."""
    n = len(groups)
    inputs = np.full((n, width), pad_id, dtype=np.int32)
    targets = np.full((n, width), pad_id, dtype=np.int32)
    mask = np.zeros((n, width), dtype=np.float32)
    segment = np.zeros((n, width), dtype=np.int32)  # 0 = padding, k = the row's k-th example
    for row, group in enumerate(groups):
        start = 0
        for k, example in enumerate(group, start=1):
            shifted = collate([example], pad_id)  # the example's own shift and mask, unpadded below
            length = len(example.input_ids) - 1
            inputs[row, start:start + length] = shifted["inputs"][0, :length]
            targets[row, start:start + length] = shifted["targets"][0, :length]
            mask[row, start:start + length] = shifted["mask"][0, :length]
            segment[row, start:start + length] = k
            start += length
    causal = np.tri(width, dtype=bool)
    attend = (segment[:, :, None] == segment[:, None, :]) & causal
    return {"inputs": inputs, "targets": targets, "mask": mask, "attend": attend[:, None]}


@dataclass
class TrainBatches:
    """What a training step's micro-batches are made of, for both loops: `lengths` of the units the cursor
    batches (examples, or packed rows), and `collate` of a batch of unit indices into arrays."""

    examples: Sequence[Example]
    pad_id: int
    decoder_start_id: int | None
    loss_chunk: int  # target rows per chunk of the head (0: unchunked)
    packing: bool = False
    max_length: int = 0

    def __post_init__(self) -> None:
        self.width = round_up(self.max_length - 1) if self.packing else 0
        positions = [len(e.input_ids) - 1 for e in self.examples]
        self.rows = pack_rows(positions, self.width) if self.packing else None
        self.lengths = ([e.length for e in self.examples] if self.rows is None else
                        [sum(len(self.examples[i].input_ids) for i in row) for row in self.rows])

    def collate(self, batch: Sequence[int]) -> dict[str, np.ndarray]:
        if self.rows is None:
            arrays = collate([self.examples[i] for i in batch], self.pad_id, self.decoder_start_id)
            return with_loss_rows(arrays, self.loss_chunk)
        groups = [[self.examples[i] for i in self.rows[r]] for r in batch]
        # A packed batch always runs the split head (the model call has no attention-mask argument on MLX):
        # unchunked means one chunk holding every target row.
        arrays = collate_rows(groups, self.width, self.pad_id)
        return with_loss_rows(arrays, self.loss_chunk or self.width * len(batch))


def batch_layout(examples: Sequence[Example], batch_size: int, max_length: int) -> dict[str, dict[str, float]]:
    """How an epoch of causal examples would be batched both ways, for `trmlx check`: batches, and the share of
    computed positions that are padding, length-bucketed (each batch as wide as its longest member) and packed."""
    real = [len(e.input_ids) - 1 for e in examples]
    if not real:
        return {}
    batches = bucket_batches([e.length for e in examples], batch_size, seed=0, shuffle=False)
    bucketed = sum(len(b) * round_up(max(real[i] for i in b)) for b in batches)
    width = round_up(max_length - 1)
    rows = pack_rows(real, width)
    packed = len(rows) * width
    return {"bucketed": {"batches": len(batches), "padding": round(1 - sum(real) / bucketed, 4)},
            "packed": {"batches": -(-len(rows) // batch_size), "rows": len(rows), "width": width,
                       "padding": round(1 - sum(real) / packed, 4)}}
