"""The parts of a training loop that are the same on every backend: where in the data we are, when to log,
evaluate and save, how checkpoints are laid out and swapped in atomically, and what a report says.

A backend's loop keeps only tensor work (forward, backward, optimizer) and reads/writes its own state files.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from trmlx.checkpoints import KEEP_CHECKPOINTS, Checkpoints, Position  # noqa: F401  (the loop's public names)
from trmlx.data.examples import Example, bucket_batches, round_up
from trmlx.errors import UserError
from trmlx.recipe.schema import Recipe, TrainConfig
from trmlx.report import StepReport

# Model families whose logits are exactly lm_head(backbone(inputs)) (no scaling or soft-capping after the head):
# their training loss runs the head over target rows only, in chunks of train.loss_chunk_size (backends/*/loss.py).
CHUNKED_LOSS_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Encoder-decoders whose logits are lm_head(decoder states), the states scaled by d_model**-0.5 first where the
# model does so (T5 v1.0): chunked the same way, the head over target rows of the decoder.
CHUNKED_SEQ2SEQ_TYPES = frozenset({"t5", "mt5"})


def chunked_loss(model_type: str, peft_method: str) -> bool:
    """Whether a model's loss is chunked: its family's head splits off, and no virtual tokens shift positions (T5
    prompt tuning prepends to the encoder only, so its decoder positions are the real ones)."""
    if model_type in CHUNKED_SEQ2SEQ_TYPES:
        return peft_method != "prefix"
    return model_type in CHUNKED_LOSS_TYPES and peft_method not in ("prompt", "prefix")


def require_packable(recipe: Recipe, config: dict, head_splits: bool) -> None:
    """With data.packing, stop unless the model trains packed rows exactly (trmlx.data.packing): rotary positions
    (only distances count, so a row's running positions equal each example's own), a head that splits off (the
    packed forward passes its own attention mask to the backbone) and no sliding window narrower than a row."""
    if not recipe.data.packing:
        return
    model_type, width = config.get("model_type", ""), round_up(recipe.data.max_length - 1)
    if model_type not in CHUNKED_LOSS_TYPES or not head_splits:
        raise UserError(f"data.packing: model type {model_type!r} cannot be packed exactly; packing supports "
                        f"{', '.join(sorted(CHUNKED_LOSS_TYPES))} (rotary positions); set data.packing = false")
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", model_type == "mistral") and window < width:
        raise UserError(f"data.packing: the model's sliding window ({window} tokens) is narrower than a packed "
                        f"row ({width}); set data.max_length <= {window} or data.packing = false")


class BatchCursor:
    """Length-bucketed micro-batches, epoch after epoch; the order of epoch e is a function of (seed, e), so a
    position (epoch, cursor) is enough to continue the same sequence after a restart."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, position: Position):
        self.lengths, self.batch_size, self.seed, self.position = lengths, batch_size, seed, position
        self.order = bucket_batches(lengths, batch_size, seed=seed + position.epoch)

    def next(self) -> list[int]:
        if self.position.cursor == len(self.order):
            self.position.epoch, self.position.cursor = self.position.epoch + 1, 0
            self.order = bucket_batches(self.lengths, self.batch_size, seed=self.seed + self.position.epoch)
        batch = self.order[self.position.cursor]
        self.position.cursor += 1
        return batch

    @property
    def epoch(self) -> float:
        return self.position.epoch + self.position.cursor / len(self.order)


class Schedule:
    """When to log, validate and checkpoint."""

    def __init__(self, train: TrainConfig, total: int):
        self.train, self.total = train, total

    def log(self, step: int) -> bool:
        return step % self.train.log_every == 0 or step == self.total

    def validate(self, step: int) -> bool:
        return bool(self.train.eval_every and step % self.train.eval_every == 0) or step == self.total

    def save(self, step: int) -> bool:
        return bool(self.train.save_every and step % self.train.save_every == 0) or step == self.total


class ReportWindow:
    """Token-weighted loss and throughput since the last logged report; validation time is not counted as
    training. The sums live in the Position, so they are checkpointed with it."""

    def __init__(self, position: Position):
        self.position = position
        self.start = self.reported_at = time.perf_counter()

    def add(self, loss_sum: float, tokens: float) -> None:
        self.position.window_loss += loss_sum
        self.position.window_tokens += tokens
        self.position.trained_tokens += int(tokens)

    def report(self, step: int, epoch: float, lr: float, peak_memory_gb: float) -> StepReport:
        """The report of the window so far; changes nothing until `clear` (the consumer may never receive it)."""
        self.reported_at = time.perf_counter()
        seconds, tokens = self.reported_at - self.start, self.position.window_tokens
        return StepReport(step=step, epoch=epoch, loss=self.position.window_loss / max(tokens, 1.0),
                          learning_rate=lr, tokens_per_second=tokens / max(seconds, 1e-9),
                          trained_tokens=self.position.trained_tokens, peak_memory_gb=peak_memory_gb,
                          elapsed_seconds=self.position.elapsed_seconds + seconds)

    def clear(self) -> None:
        """The reported window is logged: start the next one."""
        self.position.elapsed_seconds += self.reported_at - self.start
        self.position.window_loss, self.position.window_tokens = 0.0, 0.0
        self.start = time.perf_counter()

    def restart_clock(self) -> None:
        self.start = time.perf_counter()


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C waits until the block ends, then raises: an optimizer update and the position that counts it land
    together, never one without the other (which would make a resume repeat or skip a step)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield  # signals reach only the main thread; an ignored SIGINT (nohup, a background job) stays ignored
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def due_records(schedule: "Schedule", step: int, validating: bool) -> list[str]:
    """What step `step` owes the log once its update is applied: its train report, its validation."""
    return (["train"] if schedule.log(step) else []) + (["eval"] if validating and schedule.validate(step) else [])


def step_records(position: Position, window: ReportWindow, epoch: float, lr: float, peak: Callable[[], float],
                 validation: Callable[[], tuple[float, dict[str, float]]]) -> Iterator[StepReport]:
    """The records the completed step `position.step` still owes (position.pending), in order. A record leaves
    `pending` only once the consumer holds it (the core logs a record it received before passing a Ctrl-C
    back in), so a checkpoint written at any moment tells a resume exactly which records are missing."""
    if "train" in position.pending:
        report = window.report(position.step, epoch, lr, peak())
        try:
            yield report
        finally:
            window.clear()
            position.pending.remove("train")
    if "eval" in position.pending:
        loss, per_task = validation()
        report = eval_report(position.step, epoch, loss, position, peak(), per_task)
        try:
            yield report
        finally:
            position.pending.remove("eval")
            window.restart_clock()


def validate(evaluate: Callable[[Sequence[Example]], dict[str, float]],
             examples: Sequence[Example]) -> tuple[float, dict[str, float]]:
    """Validation loss over all examples and, for multitask data, per task: (loss, {task: loss})."""
    tasks = sorted({e.task for e in examples})
    overall = evaluate(examples)["loss"]
    if len(tasks) < 2:
        return overall, {}
    return overall, {t: evaluate([e for e in examples if e.task == t])["loss"] for t in tasks}


def diverged(loss: float, step: int, lr: float, last_checkpoint: Path | None) -> UserError:
    """The NaN/inf stop: what happened, what was kept, what to try."""
    return UserError(f"train: loss became {loss} at step {step}; stopped without saving this step (last good "
                     f"checkpoint: {last_checkpoint or 'none'}). Try a lower train.lr (now {lr:g}), "
                     "train.grad_clip = 1.0, or model.dtype = \"fp32\"")


# ------------------------------------------------------------------------ decisions every backend's loop makes

def require_examples(train_set: Sequence) -> None:
    """A clear error before any work when nothing is left to train on."""
    if not train_set:
        raise UserError("data.train: no training examples left after checks and truncation")


def step_seed(cfg: TrainConfig, completed_steps: int) -> int:
    """The dropout RNG seed of the next step: a function of (seed, step) only, so a resumed run draws exactly the
    same masks as an uninterrupted one."""
    return cfg.seed * 1_000_003 + completed_steps


def rewind(position: Position, step: int, step_start: tuple[int, int]) -> None:
    """Ctrl-C inside a step: give back the micro-batches it consumed, so the checkpoint holds the last complete
    step (a step is complete once its update is applied and position.step set)."""
    if position.step < step:
        position.epoch, position.cursor = step_start


def eval_report(step: int, epoch: float, loss: float, position: Position, peak_memory_gb: float,
                task_losses: dict[str, float] | None = None) -> StepReport:
    """The validation report, the same keys on every backend."""
    return StepReport(step=step, epoch=epoch, loss=loss, kind="eval", task_losses=task_losses or {},
                      trained_tokens=position.trained_tokens, peak_memory_gb=peak_memory_gb,
                      elapsed_seconds=position.elapsed_seconds)
