"""Contrastive batches: no text twice in a batch (a duplicate is a false in-batch negative), in an order that is a
function of (seed, epoch) so a resumed run continues the same sequence; the step count; the report window."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Sequence

from trmlx.embedding.examples import EmbeddingExample
from trmlx.loop import Position, ReportWindow
from trmlx.recipe.schema import Recipe
from trmlx.report import StepReport


def unique_text_batches(examples: Sequence[EmbeddingExample], batch_size: int, seed: int,
                        shuffle: bool = True) -> list[list[int]]:
    """Batches in which no text (query, answer or negative) occurs twice — sentence-transformers'
    NoDuplicatesBatchSampler: walk the seeded order, take an example when none of its texts is in the batch
    yet, skip it for a later batch otherwise. The last batches may be short; every example is used once."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    remaining = dict.fromkeys(order)
    batches = []
    while remaining:
        batch: list[int] = []
        seen: set[str] = set()
        for index in remaining:
            texts = examples[index].texts()
            if texts & seen:
                continue
            batch.append(index)
            seen |= texts
            if len(batch) == batch_size:
                break
        for index in batch:
            del remaining[index]
        batches.append(batch)
    return batches


class UniqueBatchCursor:
    """BatchCursor's twin for embeddings: the batches of epoch e are a function of (seed, e), so a Position
    (epoch, cursor) continues the same sequence after a restart."""

    def __init__(self, examples: Sequence[EmbeddingExample], batch_size: int, seed: int, position: Position):
        self.examples, self.batch_size, self.seed, self.position = examples, batch_size, seed, position
        self.order = unique_text_batches(examples, batch_size, seed + position.epoch)

    def next(self) -> list[int]:
        if self.position.cursor == len(self.order):
            self.position.epoch, self.position.cursor = self.position.epoch + 1, 0
            self.order = unique_text_batches(self.examples, self.batch_size, self.seed + self.position.epoch)
        batch = self.order[self.position.cursor]
        self.position.cursor += 1
        return batch

    @property
    def epoch(self) -> float:
        return self.position.epoch + self.position.cursor / len(self.order)


def steps_for(examples: Sequence[EmbeddingExample], recipe: Recipe) -> int:
    from trmlx.schedule import total_steps

    return total_steps(recipe.train, len(unique_text_batches(examples, recipe.train.batch_size, recipe.train.seed)))


class QueryWindow(ReportWindow):
    """ReportWindow for contrastive steps: the loss is the mean over queries (the Position's window_tokens counts
    queries here, so the window is checkpointed with it), throughput counts real tokens."""

    def __init__(self, position: Position):
        super().__init__(position)
        self.tokens = 0

    def add(self, loss_sum: float, queries: int, tokens: int) -> None:  # type: ignore[override]
        self.position.window_loss += loss_sum
        self.position.window_tokens += queries
        self.position.trained_tokens += tokens
        self.tokens += tokens

    def report(self, step: int, epoch: float, lr: float, peak_memory_gb: float) -> StepReport:
        report = super().report(step, epoch, lr, peak_memory_gb)
        return replace(report, tokens_per_second=self.tokens / max(self.reported_at - self.start, 1e-9))

    def clear(self) -> None:
        super().clear()
        self.tokens = 0
