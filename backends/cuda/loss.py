"""The training loss of a causal LM on torch: cross-entropy over target tokens only, the vocabulary-sized head run
chunk by chunk.

Unchunked, a batch of T tokens materialises T × vocabulary logits, their fp32 copy, softmax and gradient. Here the
backbone's hidden states of the positions that carry a loss (prompt and padding positions need no logits) go
through the head `train.loss_chunk_size` rows at a time inside one autograd function that computes each chunk's
loss and its gradients together (the fused linear cross-entropy of Liger and TRL, written in plain torch so it
runs on a CPU as on a GPU): only one chunk's logits ever exist. Same sum and gradients as the unchunked loss
within float rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from trmlx.loop import CHUNKED_LOSS_TYPES  # families whose head splits off (no logit post-processing)



def split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(backbone returning last_hidden_state, head linear) of a plain or LoRA-wrapped decoder-only model; None for
    anything else (virtual tokens, T5, data-parallel wrappers, families with logit post-processing)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        if model.peft_config["default"].peft_type.value != "LORA":
            return None
        model = model.get_base_model()
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(config, "model_type", None) not in CHUNKED_LOSS_TYPES or not isinstance(head, torch.nn.Linear) \
            or not hasattr(model, "model"):
        return None
    return model.model, head


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i · CE(h_i · Wᵀ (+ b), t_i), chunk rows at a time; the gradients are computed in the forward pass,
    chunk by chunk, so the backward pass only scales them."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, weights: torch.Tensor, chunk: int) -> torch.Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)  # the loss's dtype: fp32 at least, as unchunked
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if weight.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if bias is not None and bias.requires_grad else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            w = weights[start:start + chunk].to(acc)
            logits = torch.nn.functional.linear(h, weight, bias).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, t[:, None])[:, 0]) * w).sum()
            # d/dlogits of w·CE = w · (softmax - onehot), in place over the chunk's logits
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(t), device=grad.device), t] -= 1.0
            grad.mul_(w[:, None])
            grad = grad.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad @ weight.to(h.dtype)
            if grad_weight is not None:
                grad_weight += (grad.T @ h).to(acc)
            if grad_bias is not None:
                grad_bias += grad.to(acc).sum(0)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight,
                                                                                  grad_bias)))
        ctx.needs = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        grads = [(g * grad_output).to(dtype) if needed else None
                 for g, needed, dtype in zip(ctx.saved_tensors, ctx.needs, ctx.dtypes)]
        return (*grads, None, None, None)


def chunked_token_loss(parts: tuple[torch.nn.Module, torch.nn.Linear], batch: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over target tokens and their count: the head over `loss_rows` only (see
    trmlx.data.examples.with_loss_rows), one chunk of rows at a time; the same sum and gradients as unchunked."""
    backbone, head = parts
    # Packed rows (trmlx.data.packing) bring their block-diagonal causal mask: a 4D boolean mask, which
    # transformers passes to SDPA as it is.
    attend = {"attention_mask": batch["attend"]} if "attend" in batch else {}
    hidden = backbone(input_ids=batch["inputs"].long(), use_cache=False, **attend).last_hidden_state
    rows, chunk = batch["loss_rows"].reshape(-1).long(), batch["loss_rows"].shape[1]
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    targets = batch["targets"].long().reshape(-1).index_select(0, rows)
    return _LinearCrossEntropy.apply(picked, head.weight, head.bias, targets, batch["loss_weights"].reshape(-1),
                                     chunk), batch["mask"].sum()
