"""The MLX training loop: one readable function. Batches, masks and the LR curve come from the core; this file
only turns them into MLX arrays, gradients and optimizer updates, and checkpoints them so a resume is exact.

Loss: token-weighted mean over all target tokens of an optimizer step, so batch 4 × accumulation 1 and
batch 2 × accumulation 2 give the same update.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from trmlx.backend import LoadedModel
from trmlx.data.examples import Example, bucket_batches, collate, with_loss_rows
from trmlx.data.packing import TrainBatches
from trmlx.errors import TrainingInterrupted, UserError
from trmlx.loop import (BatchCursor, Checkpoints, Position, ReportWindow, Schedule, diverged, due_records,
                        interrupts_deferred, require_examples, rewind, step_records, step_seed, validate)
from trmlx.recipe.schema import Recipe
from trmlx.report import StepReport
from trmlx.rundir import RunDir
from trmlx.schedule import learning_rate, total_steps

from trmlx.backends.mlx.loss import chunked_token_loss, split_head


def token_loss(model: nn.Module, batch: dict[str, mx.array]) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over target tokens, and their count (the caller divides once per optimizer step).
    Batches with loss_rows (trmlx.data.examples.with_loss_rows) run the head over those rows only, chunked."""
    if "loss_rows" in batch:
        return chunked_token_loss(split_head(model), batch, training=model.training)
    if "decoder_inputs" in batch:  # encoder-decoder (T5)
        logits = model(batch["inputs"], batch["attention_mask"], batch["decoder_inputs"])
    else:
        logits = model(batch["inputs"])
    mask = batch["mask"]
    return (nn.losses.cross_entropy(logits.astype(mx.float32), batch["targets"]) * mask).sum(), mask.sum()


def to_mx(batch: dict) -> dict[str, mx.array]:
    return {k: mx.array(v) for k, v in batch.items()}


def evaluate_loss(loaded: LoadedModel, examples: Sequence[Example], batch_size: int,
                  max_batches: int = 0) -> dict[str, float]:
    """Mean NLL per target token over the examples (batched by length, no shuffle)."""
    chunk = loaded.handle.get("loss_chunk", 0)  # 0: unchunked (see backends/*/loss.py)
    model, pad, start = loaded.model, loaded.tokenizer.pad_token_id, loaded.handle.get("decoder_start_id")
    batches = bucket_batches([e.length for e in examples], batch_size, seed=0, shuffle=False)
    total, tokens = 0.0, 0.0
    was_training = model.training
    model.eval()
    for batch in batches[:max_batches] if max_batches else batches:
        arrays = with_loss_rows(collate([examples[i] for i in batch], pad, start), chunk)
        loss, count = token_loss(model, to_mx(arrays))
        mx.eval(loss, count)
        total, tokens = total + loss.item(), tokens + count.item()
    model.train(was_training)
    return {"loss": total / max(tokens, 1.0), "tokens": tokens}


def make_optimizer(recipe: Recipe) -> optim.Optimizer:
    train = recipe.train
    if train.optimizer == "adafactor":
        return optim.Adafactor(learning_rate=train.lr, relative_step=False, scale_parameter=False)
    # bias_correction: standard AdamW (torch's), which mlx leaves off by default.
    return optim.AdamW(learning_rate=train.lr, weight_decay=train.weight_decay, bias_correction=True)


def train_loop(loaded: LoadedModel, recipe: Recipe, train_set: Sequence[Example], valid_set: Sequence[Example],
               run_dir: Path, resume: bool = False) -> Iterator[StepReport]:
    """Train, yielding a report every log_every steps and after each validation; checkpoint atomically."""
    chunk = loaded.handle.get("loss_chunk", 0)  # target rows per head + cross-entropy chunk
    model, cfg, pad = loaded.model, recipe.train, loaded.tokenizer.pad_token_id
    decoder_start = loaded.handle.get("decoder_start_id")
    require_examples(train_set)
    checkpoints = Checkpoints(RunDir(Path(run_dir)), backend="mlx")
    # Length-bucketed examples, or packed rows of them (data.packing): the cursor batches whichever it is.
    data = TrainBatches(train_set, pad, decoder_start, chunk, recipe.data.packing, recipe.data.max_length)
    steps = total_steps(cfg, math.ceil(len(data.lengths) / cfg.batch_size))
    schedule = Schedule(cfg, steps)
    optimizer = make_optimizer(recipe)
    block = loaded.handle.get("checkpoint_block") or model.layers[0]
    block_type = type(block)
    plain_call = block_type.__call__
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(block)  # patches the block class; restored when training ends
    model.train()
    grad_fn = nn.value_and_grad(model, token_loss)
    state = [model.state, mx.random.state]

    def micro_step(batch: dict[str, mx.array]):
        return grad_fn(model, batch)

    micro_step = mx.compile(micro_step, inputs=state, outputs=state)  # retraced once per new batch shape

    position, last_checkpoint, step, step_start = Position(), None, 0, (0, 0)
    if resume:
        last_checkpoint, position = checkpoints.latest()
    apply_update = compiled_update(model, optimizer, last_checkpoint)
    batches = BatchCursor(data.lengths, cfg.batch_size, cfg.seed, position)
    window = ReportWindow(position)
    mx.reset_peak_memory()

    def peak() -> float:
        return mx.get_peak_memory() / 1e9

    def validation() -> tuple[float, dict[str, float]]:
        return validate(lambda subset: evaluate_loss(loaded, subset, cfg.batch_size, cfg.max_eval_batches),
                        valid_set)

    try:
        # A resume first delivers what the interrupted step still owed the log (e.g. a cut-off validation).
        yield from step_records(position, window, batches.epoch, learning_rate(position.step, cfg, steps), peak,
                                validation)
        while position.step < steps:
            step_start = (position.epoch, position.cursor)  # restored if Ctrl-C lands inside this step
            step, lr = position.step + 1, learning_rate(position.step + 1, cfg, steps)
            mx.random.seed(step_seed(cfg, position.step))
            grads, loss_sum, token_sum = None, mx.array(0.0), mx.array(0.0)
            for _ in range(cfg.grad_accum):
                batch = data.collate(batches.next())
                (loss, count), g = micro_step(to_mx(batch))
                grads = g if grads is None else tree_map(mx.add, grads, g)
                loss_sum, token_sum = loss_sum + loss, token_sum + count
            grads = tree_map(lambda g: g / token_sum, grads)
            if cfg.grad_clip:
                grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
            mx.eval(loss_sum, token_sum, grads)  # the backward pass runs here, where Ctrl-C may still cut in
            if not math.isfinite(loss_sum.item()):
                raise diverged(loss_sum.item(), step, cfg.lr, last_checkpoint)
            with interrupts_deferred():  # the update and the position that counts it: both or neither
                optimizer.learning_rate = lr
                apply_update(grads)
                mx.eval(model.trainable_parameters(), optimizer.state)
                window.add(loss_sum.item(), token_sum.item())
                position.pending = due_records(schedule, step, bool(valid_set))
                position.step = step
            yield from step_records(position, window, batches.epoch, lr, peak, validation)
            if schedule.save(step):
                last_checkpoint = checkpoints.save(position, lambda folder: save_state(folder, model, optimizer))
    except KeyboardInterrupt:
        rewind(position, step, step_start)
        folder = checkpoints.save(position, lambda folder: save_state(folder, model, optimizer))
        raise TrainingInterrupted(str(folder)) from None
    finally:
        block_type.__call__ = plain_call  # later models of this class (eval, other runs) run unpatched


def compiled_update(model: nn.Module, optimizer: optim.Optimizer,
                    checkpoint: Path | None) -> Callable[[dict], None]:
    """The optimizer's state, restored from `checkpoint` or fresh (what its first update would make), and
    optimizer.update(model, grads) as one compiled graph over it: op by op, AdamW launches ~15 small kernels per
    trainable array (benchmarks/mlx_vs_mlx_lm.py's steady step: 28.0 -> 25.5 ms). The learning rate and the step
    count live in optimizer.state, so a new rate is an input, not a retrace."""
    if checkpoint is not None:
        restore_state(checkpoint, model, optimizer)  # replaces optimizer.state: before the compile captures it
    else:
        optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state]
    return mx.compile(partial(optimizer.update, model), inputs=state, outputs=state)


def save_state(folder: Path, model: nn.Module, optimizer: optim.Optimizer) -> None:
    """Trainable weights and optimizer state. (No RNG: it is reseeded from (seed, step) every step.)"""
    mx.save_safetensors(str(folder / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    optimizer_state = {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
    mx.save_safetensors(str(folder / "optimizer.safetensors"), optimizer_state)


def restore_state(folder: Path, model: nn.Module, optimizer: optim.Optimizer) -> None:
    try:
        weights, saved = mx.load(str(folder / "trainable.safetensors")), mx.load(str(folder / "optimizer.safetensors"))
    except (OSError, RuntimeError, ValueError) as err:  # passed the header checks, failed in the tensor data
        raise UserError(f"--resume: checkpoint {folder} cannot be loaded ({err}); delete that folder to resume "
                        "from the one before it") from None
    model.update(tree_unflatten(list(weights.items())))
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list({**dict(tree_flatten(optimizer.state)), **saved}.items()))
