"""Learning-rate schedule and step counts, decided once so both backends follow the same curve."""

from __future__ import annotations

import math

from trmlx.recipe.schema import TrainConfig


def total_steps(train: TrainConfig, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of the run: train.steps, else epochs (default 1) × steps per epoch."""
    if train.steps:
        return train.steps
    per_epoch = max(1, math.ceil(micro_batches_per_epoch / train.grad_accum))
    return max(1, math.ceil((train.epochs or 1.0) * per_epoch))


def learning_rate(step: int, train: TrainConfig, total: int) -> float:
    """LR for optimizer step `step` (1-based): linear warm-up reaching train.lr at step warmup_steps, then
    cosine/linear decay towards 0 (the first decay step uses the full rate, the last stays above 0) or flat."""
    if train.warmup_steps and step <= train.warmup_steps:
        return train.lr * step / train.warmup_steps
    if train.schedule == "constant":
        return train.lr
    span = max(1, total - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps - 1) / span)
    if train.schedule == "linear":
        return train.lr * (1.0 - progress)
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
