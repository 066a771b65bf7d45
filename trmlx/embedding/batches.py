"""Contrastive batches: no text twice in a batch (a duplicate is a false in-batch negative), in an order that is a
function of (seed, epoch) so a resumed run continues the same sequence; the step count; the report window."""

from __future__ import annotations

import random
from typing import Sequence

from trmlx.embedding.examples import EmbeddingExample
from trmlx.loop import Position
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


class QueryWindow:
    """ReportWindow for contrastive steps: the loss is the mean over queries, throughput counts real tokens."""

    def __init__(self, position: Position):
        import time

        self.position, self.clock = position, time.perf_counter
        self.loss_sum, self.queries, self.tokens, self.start = 0.0, 0, 0, self.clock()

    def add(self, loss_sum: float, queries: int, tokens: int) -> None:
        self.loss_sum += loss_sum
        self.queries += queries
        self.tokens += tokens
        self.position.trained_tokens += tokens

    def report(self, step: int, epoch: float, lr: float, peak_memory_gb: float) -> StepReport:
        now = self.clock()
        self.position.elapsed_seconds += now - self.start
        report = StepReport(step=step, epoch=epoch, loss=self.loss_sum / max(self.queries, 1), learning_rate=lr,
                            tokens_per_second=self.tokens / max(now - self.start, 1e-9),
                            trained_tokens=self.position.trained_tokens, peak_memory_gb=peak_memory_gb,
                            elapsed_seconds=self.position.elapsed_seconds)
        self.loss_sum, self.queries, self.tokens, self.start = 0.0, 0, 0, now
        return report

    def restart_clock(self) -> None:
        self.start = self.clock()
