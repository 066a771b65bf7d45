"""The parts of a training loop that are the same on every backend: where in the data we are, when to log,
evaluate and save, how checkpoints are laid out and swapped in atomically, and what a report says.

A backend's loop keeps only tensor work (forward, backward, optimizer) and reads/writes its own state files.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from trmlx.data.examples import Example, bucket_batches
from trmlx.errors import UserError
from trmlx.recipe.schema import TrainConfig
from trmlx.report import StepReport
from trmlx.rundir import RunDir, atomic_write

# Model families whose logits are exactly lm_head(backbone(inputs)) (no scaling or soft-capping after the head):
# their training loss runs the head over target rows only, in chunks of train.loss_chunk_size (backends/*/loss.py).
CHUNKED_LOSS_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def chunked_loss(model_type: str, peft_method: str) -> bool:
    """Whether a model's loss is chunked: its family's head splits off, and no virtual tokens shift positions."""
    return model_type in CHUNKED_LOSS_TYPES and peft_method not in ("prompt", "prefix")

KEEP_CHECKPOINTS = 2  # older ones are deleted once a newer one is safely on disk


@dataclass
class Position:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0  # micro-batches of this epoch already consumed
    trained_tokens: int = 0
    elapsed_seconds: float = 0.0


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


class Checkpoints:
    """RUN/checkpoints/step-NNNNNNN/ folders written into a temp folder and renamed; `latest` names the newest."""

    def __init__(self, run: RunDir):
        self.root = run.checkpoints
        self.run = run

    def save(self, position: Position, write_state: Callable[[Path], None]) -> Path:
        """`write_state(folder)` writes the backend's tensors; position.json is written last, then the rename."""
        final = self.root / f"step-{position.step:07d}"
        tmp = self.root / f".step-{position.step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_state(tmp)
        atomic_write(tmp / "position.json", json.dumps(asdict(position)))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        atomic_write(self.root / "latest", final.name)
        for old in sorted(self.root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> tuple[Path, Position]:
        pointer = self.root / "latest"
        if not pointer.is_file():
            raise UserError(f"--resume {self.run.path}: no checkpoint found (expected {pointer})")
        folder = self.root / pointer.read_text().strip()
        return folder, Position(**json.loads((folder / "position.json").read_text()))


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
    """Token-weighted loss and throughput since the last report; validation time is not counted as training."""

    def __init__(self, position: Position):
        self.position = position
        self.loss_sum, self.tokens, self.start = 0.0, 0.0, time.perf_counter()

    def add(self, loss_sum: float, tokens: float) -> None:
        self.loss_sum += loss_sum
        self.tokens += tokens
        self.position.trained_tokens += int(tokens)

    def report(self, step: int, epoch: float, lr: float, peak_memory_gb: float) -> StepReport:
        now = time.perf_counter()
        self.position.elapsed_seconds += now - self.start
        report = StepReport(step=step, epoch=epoch, loss=self.loss_sum / max(self.tokens, 1.0), learning_rate=lr,
                            tokens_per_second=self.tokens / max(now - self.start, 1e-9),
                            trained_tokens=self.position.trained_tokens, peak_memory_gb=peak_memory_gb,
                            elapsed_seconds=self.position.elapsed_seconds)
        self.loss_sum, self.tokens, self.start = 0.0, 0.0, now
        return report

    def restart_clock(self) -> None:
        self.start = time.perf_counter()


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
