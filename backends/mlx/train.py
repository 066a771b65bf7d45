"""The MLX training loop: one readable function. Batches, masks and the LR curve come from the core; this file
only turns them into MLX arrays, gradients and optimizer updates, and checkpoints them so a resume is exact.

Loss: token-weighted mean over all target tokens of an optimizer step, so batch 4 × accumulation 1 and
batch 2 × accumulation 2 give the same update.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from trmlx.backend import LoadedModel
from trmlx.data.examples import Example, bucket_batches, collate_causal
from trmlx.errors import TrainingInterrupted, UserError
from trmlx.recipe.schema import Recipe
from trmlx.report import StepReport
from trmlx.rundir import RunDir, atomic_write
from trmlx.schedule import learning_rate, total_steps

KEEP_CHECKPOINTS = 2  # older ones are deleted once a newer one is safely on disk


def token_loss(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over target tokens, and their count (the caller divides once per optimizer step)."""
    logits = model(inputs).astype(mx.float32)
    return (nn.losses.cross_entropy(logits, targets) * mask).sum(), mask.sum()


def evaluate_loss(loaded: LoadedModel, examples: Sequence[Example], batch_size: int,
                  max_batches: int = 0) -> dict[str, float]:
    """Mean NLL per target token over the examples (batched by length, no shuffle)."""
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    lengths = [len(e.input_ids) for e in examples]
    batches = bucket_batches(lengths, batch_size, seed=0, shuffle=False)
    total, tokens = 0.0, 0.0
    was_training = model.training
    model.eval()
    for batch in batches[:max_batches] if max_batches else batches:
        arrays = collate_causal([examples[i] for i in batch], pad)
        loss, count = token_loss(model, *(mx.array(arrays[k]) for k in ("inputs", "targets", "mask")))
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
    model, cfg, pad = loaded.model, recipe.train, loaded.tokenizer.pad_token_id
    if not train_set:
        raise UserError("data.train: no training examples left after checks and truncation")
    run = RunDir(Path(run_dir))
    lengths = [len(e.input_ids) for e in train_set]
    per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    steps = total_steps(cfg, per_epoch)
    optimizer = make_optimizer(recipe)
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    model.train()
    grad_fn = nn.value_and_grad(model, token_loss)
    state = [model.state, mx.random.state]

    def micro_step(inputs: mx.array, targets: mx.array, mask: mx.array):
        return grad_fn(model, inputs, targets, mask)

    micro_step = mx.compile(micro_step, inputs=state, outputs=state)  # retraced once per new batch shape

    # Position in the data: micro-batch `cursor` of epoch `epoch` (order = bucketed, shuffled by seed + epoch).
    step, epoch, cursor, trained_tokens, elapsed = 0, 0, 0, 0, 0.0
    if resume:
        step, epoch, cursor, trained_tokens, elapsed = restore_checkpoint(run, model, optimizer)
    order = bucket_batches(lengths, cfg.batch_size, seed=cfg.seed + epoch)
    window_loss, window_tokens, window_start, last_checkpoint = 0.0, 0.0, time.perf_counter(), None
    mx.reset_peak_memory()
    try:
        while step < steps:
            # The dropout RNG is a function of (seed, step), so a resumed run draws exactly the same masks.
            mx.random.seed(cfg.seed * 1_000_003 + step)
            grads, loss_sum, token_sum = None, mx.array(0.0), mx.array(0.0)
            for _ in range(cfg.grad_accum):
                if cursor == len(order):
                    epoch, cursor = epoch + 1, 0
                    order = bucket_batches(lengths, cfg.batch_size, seed=cfg.seed + epoch)
                arrays = collate_causal([train_set[i] for i in order[cursor]], pad)
                cursor += 1
                (loss, count), g = micro_step(*(mx.array(arrays[k]) for k in ("inputs", "targets", "mask")))
                grads = g if grads is None else tree_map(mx.add, grads, g)
                loss_sum, token_sum = loss_sum + loss, token_sum + count
            step += 1
            grads = tree_map(lambda g: g / token_sum, grads)
            if cfg.grad_clip:
                grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
            optimizer.learning_rate = learning_rate(step, cfg, steps)
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state, loss_sum, token_sum)
            step_loss = loss_sum.item() / max(token_sum.item(), 1.0)
            if not math.isfinite(step_loss):
                raise UserError(f"train: loss became {step_loss} at step {step}; stopped without saving this step "
                                f"(last good checkpoint: {last_checkpoint or 'none'}). Try a lower train.lr "
                                f"(now {cfg.lr:g}), train.grad_clip = 1.0, or model.dtype = \"fp32\"")
            trained_tokens += int(token_sum.item())
            window_loss += loss_sum.item()
            window_tokens += token_sum.item()
            if step % cfg.log_every == 0 or step == steps:
                now = time.perf_counter()
                elapsed += now - window_start
                yield StepReport(step=step, epoch=epoch + cursor / len(order), loss=window_loss / window_tokens,
                                 learning_rate=learning_rate(step, cfg, steps),
                                 tokens_per_second=window_tokens / max(now - window_start, 1e-9),
                                 trained_tokens=trained_tokens, peak_memory_gb=mx.get_peak_memory() / 1e9,
                                 elapsed_seconds=elapsed)
                window_loss, window_tokens, window_start = 0.0, 0.0, time.perf_counter()
            if valid_set and ((cfg.eval_every and step % cfg.eval_every == 0) or step == steps):
                result = evaluate_loss(loaded, valid_set, cfg.batch_size, cfg.max_eval_batches)
                yield StepReport(step=step, epoch=epoch + cursor / len(order), loss=result["loss"], kind="eval",
                                 trained_tokens=trained_tokens, peak_memory_gb=mx.get_peak_memory() / 1e9,
                                 elapsed_seconds=elapsed)
                window_start = time.perf_counter()  # validation time is not training throughput
            if (cfg.save_every and step % cfg.save_every == 0) or step == steps:
                last_checkpoint = save_checkpoint(run, model, optimizer, step, epoch, cursor, trained_tokens,
                                                  elapsed)
    except KeyboardInterrupt:
        # The last completed step is consistent (updates are evaluated before the loop continues): save it.
        raise TrainingInterrupted(str(save_checkpoint(run, model, optimizer, step, epoch, cursor,
                                                      trained_tokens, elapsed))) from None


def save_checkpoint(run: RunDir, model: nn.Module, optimizer: optim.Optimizer, step: int, epoch: int, cursor: int,
                    trained_tokens: int, elapsed: float) -> Path:
    """Write trainable weights, optimizer state and data position into a temp folder, then rename it.
    (The RNG needs no saving: it is reseeded from (seed, step) every step.)"""
    final = run.checkpoints / f"step-{step:07d}"
    tmp = run.checkpoints / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    optimizer_state = {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), optimizer_state)
    position = {"step": step, "epoch": epoch, "cursor": cursor, "trained_tokens": trained_tokens,
                "elapsed_seconds": elapsed}
    atomic_write(tmp / "state.json", json.dumps(position))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write(run.checkpoints / "latest", final.name)
    for old in sorted(run.checkpoints.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore_checkpoint(run: RunDir, model: nn.Module, optimizer: optim.Optimizer) -> tuple[int, int, int, int, float]:
    """Load the latest checkpoint into model and optimizer; return (step, epoch, cursor, tokens, elapsed)."""
    pointer = run.checkpoints / "latest"
    if not pointer.is_file():
        raise UserError(f"--resume {run.path}: no checkpoint found (expected {pointer})")
    folder = run.checkpoints / pointer.read_text().strip()
    model.update(tree_unflatten(list(mx.load(str(folder / "trainable.safetensors")).items())))
    saved = mx.load(str(folder / "optimizer.safetensors"))
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list({**dict(tree_flatten(optimizer.state)), **saved}.items()))
    position = json.loads((folder / "state.json").read_text())
    return (position["step"], position["epoch"], position["cursor"], position["trained_tokens"],
            position["elapsed_seconds"])
