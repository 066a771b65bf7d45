"""The training loss of a causal LM or a T5 on MLX: cross-entropy over target tokens only, the vocabulary-sized
head run chunk by chunk.

Unchunked, a batch of T tokens materialises T × vocabulary logits, their fp32 softmax and its gradient (at 152,064
words and 4,096 tokens: 2.5 GB per fp32 copy). Here the backbone's hidden states of the positions that carry a
loss (prompt and padding positions need no logits at all) go through the head `train.loss_chunk_size` rows at a
time. With a frozen head (LoRA, DoRA, QLoRA) each chunk's forward also computes its gradient with respect to the
hidden states, as torch's fused function does (backends/cuda/loss.py): the backward pass only scales the stored
(rows × hidden) gradients, so no logits are recomputed and one chunk's logits and softmax exist at a time
(measured: ~5 fp32 copies of a chunk's rows × vocabulary, 8 when recomputed). A trained head (full fine-tuning,
an adapted lm_head) recomputes each chunk's logits in the backward pass instead (mx.checkpoint), so its weight
gradient comes from autodiff. The sum is the same as the full loss within float rounding.
A T5's decoder is the backbone: its final states (scaled by d_model**-0.5 where the model scales them,
T5.decoder_states) go through the same chunked head.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from trmlx.loop import CHUNKED_LOSS_TYPES  # families whose head splits off (no logit post-processing)

from trmlx.backends.mlx.t5 import T5

Hidden = Callable[[dict[str, mx.array]], mx.array]  # batch -> the final states the head takes, (B, L, hidden)


def split_head(model: nn.Module) -> tuple[Hidden, nn.Module, Callable[[mx.array], mx.array]] | None:
    """(batch -> final hidden states, head module, head function) of a plain mlx-lm decoder or a T5 (plain, LoRA or
    prompt-tuned: t5_prompt prepends to the encoder only); None for anything else (causal virtual-token wrappers,
    families with logit post-processing)."""
    t5 = getattr(model, "base", model)
    if isinstance(t5, T5):
        def decoder_hidden(batch: dict[str, mx.array]) -> mx.array:
            return model.train_states(batch["inputs"], batch["attention_mask"], batch["decoder_inputs"])

        return (decoder_hidden, t5.lm_head, t5.lm_head) if "lm_head" in t5 else \
            (decoder_hidden, t5.shared, t5.shared.as_linear)
    args = getattr(model, "args", None)
    backbone = getattr(model, "model", None)
    if backbone is None or getattr(args, "model_type", None) not in CHUNKED_LOSS_TYPES:
        return None

    def causal_hidden(batch: dict[str, mx.array]) -> mx.array:
        return backbone(batch["inputs"]) if "attend" not in batch else packed_hidden(backbone, batch)

    if getattr(args, "tie_word_embeddings", False):
        embed = backbone.embed_tokens
        return causal_hidden, embed, embed.as_linear
    head = getattr(model, "lm_head", None)
    return (causal_hidden, head, head) if head is not None else None


def packed_hidden(backbone: nn.Module, batch: dict[str, mx.array]) -> mx.array:
    """The backbone over packed rows (trmlx.data.packing): mlx-lm's own layers, given the block-diagonal causal
    mask `attend` in place of the plain causal one (its model call takes no mask)."""
    hidden = backbone.embed_tokens(batch["inputs"])
    for layer in backbone.layers:
        hidden = layer(hidden, batch["attend"])
    return backbone.norm(hidden)


def chunked_token_loss(parts: tuple, batch: dict[str, mx.array], training: bool = True
                       ) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over target tokens and their count: the head over `loss_rows` only (see
    trmlx.data.examples.with_loss_rows), one (chunk,) row of them at a time; the same sum as the unchunked loss.
    `training` False (validation) computes the losses alone."""
    final_hidden, head_module, head = parts
    hidden = final_hidden(batch)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), batch["targets"].reshape(-1)
    if not training:
        chunk = partial(_chunk_loss, head)
    elif tree_flatten(head_module.trainable_parameters()):
        chunk = nn.utils.checkpoint(head_module, partial(_chunk_loss, head))
    else:
        chunk = _loss_with_hidden_gradient(head)
    total = mx.array(0.0)
    for rows, weights in zip(batch["loss_rows"], batch["loss_weights"]):
        # `+ 0 · total`: each chunk's head waits for the previous chunk's loss (and its gradient), so MLX's lazy
        # graph holds one chunk's logits at a time, not all of them
        hidden_rows = flat_hidden[rows] + (total * 0).astype(flat_hidden.dtype)
        total = total + chunk(hidden_rows, flat_targets[rows], weights)
    return total, batch["mask"].sum()


def _chunk_loss(head: Callable[[mx.array], mx.array], h: mx.array, t: mx.array, w: mx.array) -> mx.array:
    logits = head(h).astype(mx.float32)
    picked = mx.take_along_axis(logits, mx.stop_gradient(t)[:, None], axis=-1)[:, 0]  # no VJP for indices
    return ((mx.logsumexp(logits, axis=-1) - picked) * w).sum()


def _logits_gradient(logits: mx.array, lse: mx.array, t: mx.array, w: mx.array) -> mx.array:
    """d (w · CE) / d logits = (softmax - onehot) · w, row by row."""
    grad = mx.exp(logits - lse) * w[:, None]
    return grad.at[mx.arange(grad.shape[0]), t].add(-w)


_logits_gradient_in_place = mx.compile(_logits_gradient)  # compiled: one (rows × vocabulary) buffer, not three


def _loss_with_hidden_gradient(head: Callable[[mx.array], mx.array]) -> Callable[..., mx.array]:
    """A chunk's weighted cross-entropy whose forward also computes d loss / d hidden through the head's own VJP
    (any frozen head: linear, quantised, tied embedding); its backward scales that stored gradient."""

    @mx.custom_function
    def loss_and_gradient(h: mx.array, t: mx.array, w: mx.array) -> tuple[mx.array, mx.array]:
        logits = head(h).astype(mx.float32)
        lse = mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        grad_logits = _logits_gradient_in_place(logits, lse, t, w).astype(h.dtype)
        return ((lse[:, 0] - picked) * w).sum(), mx.vjp(head, [h], [grad_logits])[1][0]

    @loss_and_gradient.vjp
    def scale_stored_gradient(primals: tuple, cotangents: tuple, outputs: tuple) -> tuple:
        _, t, w = primals
        return cotangents[0].astype(outputs[1].dtype) * outputs[1], mx.zeros_like(t), mx.zeros_like(w)

    def chunk(h: mx.array, t: mx.array, w: mx.array) -> mx.array:
        loss, gradient = loss_and_gradient(h, t, w)
        return loss + 0 * mx.stop_gradient(gradient[0, 0])  # computed with its chunk, while the logits exist

    return chunk
