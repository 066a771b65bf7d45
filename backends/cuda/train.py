"""The torch training loop: the MLX loop's twin. Batches, masks, LR curve, checkpoint layout and reports come
from the core; this file does forward/backward (with fp16 loss scaling where the policy says fp16) and updates.

Loss: token-weighted mean over all target tokens of an optimizer step, as on MLX.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, Sequence

import torch

from trmlx.backend import LoadedModel
from trmlx.data.examples import Example, bucket_batches, collate, with_loss_rows
from trmlx.data.packing import TrainBatches
from trmlx.distributed import is_main, world_size
from trmlx.distributed import rank as distributed_rank
from trmlx.errors import TrainingInterrupted, UserError
from trmlx.loop import (BatchCursor, Checkpoints, Position, ReportWindow, Schedule, diverged, due_records,
                        interrupts_deferred, require_examples, rewind, step_records, step_seed, validate)
from trmlx.recipe.schema import Recipe
from trmlx.report import StepReport
from trmlx.rundir import RunDir
from trmlx.schedule import learning_rate, total_steps

import trmlx.backends.cuda.distributed as distributed
from trmlx.backends.cuda.device import memory
from trmlx.backends.cuda.loss import chunked_token_loss, split_head
from trmlx.backends.cuda.model import DTYPES, device


def to_torch(batch: dict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device()) for k, v in batch.items()}


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over target tokens, and their count (the caller divides once per optimizer step).
    Batches with loss_rows (trmlx.data.examples.with_loss_rows) run the head over those rows only, chunked."""
    if "loss_rows" in batch:
        return chunked_token_loss(split_head(model), batch)
    if "decoder_inputs" in batch:  # encoder-decoder (T5): padded encoder positions are masked out
        logits = model(input_ids=batch["inputs"].long(), attention_mask=batch["attention_mask"].long(),
                       decoder_input_ids=batch["decoder_inputs"].long(), use_cache=False).logits
    else:
        # Causal batches are right-padded: real tokens never attend to the padding after them, and padded
        # positions are masked out of the loss, so no attention mask is needed. No KV cache when training.
        logits = model(input_ids=batch["inputs"].long(), use_cache=False).logits
    targets = batch["targets"].long()
    logits = logits[:, -targets.shape[1]:]  # prompt tuning prepends virtual-token positions: drop them
    # Flattened (contiguous) rows: cross-entropy over a transposed view is several times slower.
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                           reduction="none")
    mask = batch["mask"]
    return (ce * mask.reshape(-1)).sum(), mask.sum()


def autocast(loaded: LoadedModel):
    dtype = loaded.handle["dtype"]
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device().type, dtype=DTYPES[dtype])


@torch.no_grad()
def evaluate_loss(loaded: LoadedModel, examples: Sequence[Example], batch_size: int,
                  max_batches: int = 0) -> dict[str, float]:
    """Mean NLL per target token over the examples (batched by length, no shuffle)."""
    chunk = loaded.handle.get("loss_chunk", 0)  # 0: unchunked (see backends/*/loss.py)
    model, pad, start = loaded.model, loaded.tokenizer.pad_token_id, loaded.handle.get("decoder_start_id")
    batches = bucket_batches([e.length for e in examples], batch_size, seed=0, shuffle=False)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0.0
    for batch in batches[:max_batches] if max_batches else batches:
        with autocast(loaded):
            arrays = with_loss_rows(collate([examples[i] for i in batch], pad, start), chunk)
            loss, count = token_loss(model, to_torch(arrays))
        total, tokens = total + loss.item(), tokens + count.item()
    model.train(was_training)
    return {"loss": total / max(tokens, 1.0), "tokens": tokens}


def make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    train = recipe.train
    if train.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=train.lr, weight_decay=train.weight_decay)
    if train.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=train.lr, relative_step=False, scale_parameter=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, eps=1e-8, betas=(0.9, 0.999))


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list, grad_clip: float,
                 lr: float) -> None:
    """One optimizer step of either CUDA loop: unscale (fp16), clip the global norm, set the step's rate, step,
    update the loss scale, clear the gradients."""
    scaler.unscale_(optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_loop(loaded: LoadedModel, recipe: Recipe, train_set: Sequence[Example], valid_set: Sequence[Example],
               run_dir: Path, resume: bool = False) -> Iterator[StepReport]:
    """Train, yielding a report every log_every steps and after each validation; checkpoint atomically."""
    chunk = loaded.handle.get("loss_chunk", 0)  # target rows per head + cross-entropy chunk
    model, cfg, pad = loaded.model, recipe.train, loaded.tokenizer.pad_token_id
    decoder_start = loaded.handle.get("decoder_start_id")
    require_examples(train_set)
    checkpoints = Checkpoints(RunDir(Path(run_dir)), backend="cuda")
    # Length-bucketed examples, or packed rows of them (data.packing): the cursor batches whichever it is.
    data = TrainBatches(train_set, pad, decoder_start, chunk, recipe.data.packing, recipe.data.max_length)
    # A data-parallel step consumes world × grad_accum micro-batches.
    steps = total_steps(cfg, math.ceil(len(data.lengths) / cfg.batch_size / world_size()))
    schedule = Schedule(cfg, steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe, params)
    # fp16 has too little range for small gradients: scale the loss (T4/P100 policy). bf16/fp32 need none.
    scaler = torch.amp.GradScaler(device().type, enabled=loaded.handle["dtype"] == "fp16")
    position, last_checkpoint, step, step_start = Position(), None, 0, (0, 0)
    if resume:
        last_checkpoint, position = checkpoints.latest()
        restore_state(last_checkpoint, model, optimizer, scaler)
    batches = BatchCursor(data.lengths, cfg.batch_size, cfg.seed, position)
    rank, world = distributed_rank(), world_size()
    window = ReportWindow(position)
    model.train()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def peak() -> float:
        return memory().peak / 1e9

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
            torch.manual_seed(step_seed(cfg, position.step))
            # All ranks walk the same order; this rank takes every world-th micro-batch of the step.
            step_batches = [batches.next() for _ in range(cfg.grad_accum * world)]
            micro = [data.collate(b) for b in step_batches[rank::world]]
            token_sum = distributed.sum_scalar(float(sum(m["mask"].sum() for m in micro)))
            loss_sum = torch.zeros((), device=device())
            for arrays in micro:
                with autocast(loaded):
                    loss, _ = token_loss(model, to_torch(arrays))
                scaler.scale(loss / token_sum).backward()
                loss_sum += loss.detach()
            loss_sum = distributed.sum_scalar(loss_sum.item())  # one host sync per optimizer step
            distributed.sum_gradients(params)
            if not math.isfinite(loss_sum):
                raise diverged(loss_sum, step, cfg.lr, last_checkpoint)
            with interrupts_deferred():  # the update and the position that counts it: both or neither
                apply_update(optimizer, scaler, params, cfg.grad_clip, lr)
                window.add(loss_sum, token_sum)
                position.pending = due_records(schedule, step, bool(valid_set))
                position.step = step
            yield from step_records(position, window, batches.epoch, lr, peak, validation)
            if schedule.save(step):
                last_checkpoint = save(checkpoints, position, model, optimizer, scaler)
    except KeyboardInterrupt:
        optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is dropped; the last full step is kept
        rewind(position, step, step_start)
        raise TrainingInterrupted(str(save(checkpoints, position, model, optimizer, scaler))) from None


def save(checkpoints: Checkpoints, position: Position, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler) -> Path:
    """Rank 0 writes the checkpoint (all ranks hold the same weights); the others wait until it is on disk."""
    folder = checkpoints.root / f"step-{position.step:07d}"
    if is_main():
        folder = checkpoints.save(position, lambda f: save_state(f, model, optimizer, scaler))
    distributed.barrier()
    return folder


def save_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler) -> None:
    """Trainable weights, optimizer and loss-scaler state (no RNG: reseeded from (seed, step) every step)."""
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"trainable": trainable, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()},
               folder / "state.pt")


def restore_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler) -> None:
    try:
        state = torch.load(folder / "state.pt", map_location=device(), weights_only=False)
    except Exception as err:  # passed the zip check, failed in the pickled data: name the folder, not a traceback
        raise UserError(f"--resume: checkpoint {folder} cannot be loaded ({type(err).__name__}: {err}); delete "
                        "that folder to resume from the one before it") from None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
