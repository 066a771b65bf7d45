"""The training loss of a causal LM or a T5 / mT5 on torch: cross-entropy over target tokens only, the
vocabulary-sized head run chunk by chunk.

Unchunked, a batch of T tokens materialises T × vocabulary logits, their fp32 copy, softmax and gradient. Here the
backbone's hidden states of the positions that carry a loss (prompt and padding positions need no logits) go
through the head `train.loss_chunk_size` rows at a time inside one autograd function that computes each chunk's
loss and its gradients together (the fused linear cross-entropy of Liger and TRL, written in plain torch so it
runs on a CPU as on a GPU): only one chunk's logits ever exist. Same sum and gradients as the unchunked loss
within float rounding. A T5's decoder is the backbone: its final states (scaled by d_model**-0.5 where
transformers' forward scales them: T5 with config.scale_decoder_outputs, never MT5) go through the same head.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch

from trmlx.loop import CHUNKED_LOSS_TYPES, CHUNKED_SEQ2SEQ_TYPES  # families whose head splits off

Hidden = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # batch -> the final states the head takes


def split_head(model: torch.nn.Module) -> tuple[Hidden, torch.nn.Linear] | None:
    """(batch -> final hidden states, head linear) of a plain or LoRA-wrapped decoder-only model or T5 / mT5 (also
    prompt-tuned: peft prepends to the encoder only); None for anything else (causal virtual tokens, T5 prefix
    tuning, data-parallel wrappers, families with logit post-processing)."""
    from peft import PeftModel

    peft_type, prompt = "LORA", None
    if isinstance(model, PeftModel):
        peft_type, prompt = model.peft_config["default"].peft_type.value, model
        model = model.get_base_model()
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    model_type = getattr(config, "model_type", None)
    if not isinstance(head, torch.nn.Linear):
        return None
    if model_type in CHUNKED_SEQ2SEQ_TYPES and peft_type in ("LORA", "PROMPT_TUNING") \
            and hasattr(model, "encoder") and hasattr(model, "decoder"):
        return partial(_t5_hidden, model, prompt if peft_type == "PROMPT_TUNING" else None), head
    if model_type not in CHUNKED_LOSS_TYPES or peft_type != "LORA" or not hasattr(model, "model"):
        return None
    return partial(_causal_hidden, model.model), head


def _causal_hidden(backbone: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # Packed rows (trmlx.data.packing) bring their block-diagonal causal mask: a 4D boolean mask, which
    # transformers passes to SDPA as it is.
    attend = {"attention_mask": batch["attend"]} if "attend" in batch else {}
    return backbone(input_ids=batch["inputs"].long(), use_cache=False, **attend).last_hidden_state


def _t5_hidden(model: torch.nn.Module, prompt: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """T5ForConditionalGeneration / MT5's forward up to lm_head; with a prompt-tuning PeftModel, its virtual tokens
    before the encoder inputs and ones before the mask, as PeftModelForSeq2SeqLM.forward (peft 0.21) does."""
    ids, mask = batch["inputs"].long(), batch["attention_mask"].long()
    if prompt is None:
        encoded = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    else:
        n = prompt.peft_config["default"].num_virtual_tokens
        embeds = prompt.word_embeddings(ids)
        virtual = prompt.get_prompt(batch_size=ids.shape[0]).to(embeds.dtype)[:, :n]
        mask = torch.cat([torch.ones(ids.shape[0], n, dtype=mask.dtype, device=mask.device), mask], dim=1)
        encoded = model.encoder(inputs_embeds=torch.cat([virtual, embeds], dim=1), attention_mask=mask) \
            .last_hidden_state
    states = model.decoder(input_ids=batch["decoder_inputs"].long(), encoder_hidden_states=encoded,
                           encoder_attention_mask=mask, use_cache=False).last_hidden_state
    # transformers 5: T5 scales as its config says (v1.0 checkpoints), MT5's forward never does
    if model.config.model_type == "t5" and getattr(model.config, "scale_decoder_outputs", False):
        states = states * (model.model_dim ** -0.5)
    return states


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


def chunked_token_loss(parts: tuple[Hidden, torch.nn.Linear], batch: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over target tokens and their count: the head over `loss_rows` only (see
    trmlx.data.examples.with_loss_rows), one chunk of rows at a time; the same sum and gradients as unchunked."""
    final_hidden, head = parts
    hidden = final_hidden(batch)
    rows, chunk = batch["loss_rows"].reshape(-1).long(), batch["loss_rows"].shape[1]
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    targets = batch["targets"].long().reshape(-1).index_select(0, rows)
    weights = batch["loss_weights"].reshape(-1)
    fused = liger_loss(picked)
    if fused is not None and bool(((weights == 0) | (weights == 1)).all()):
        # liger takes 0/1 weights as ignored targets; any other weight (a NaN the loop must see) stays on ours
        return fused(picked, head.weight, torch.where(weights > 0, targets, IGNORE), head.bias,
                     ignore_index=IGNORE, reduction="sum"), batch["mask"].sum()
    return _LinearCrossEntropy.apply(picked, head.weight, head.bias, targets, weights, chunk), batch["mask"].sum()


IGNORE = -100  # the target id liger's kernel skips


def liger_loss(hidden: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """liger-kernel's fused linear cross-entropy (Triton kernels: the same arithmetic as ours, faster on a GPU)
    where it is installed and the tensors are on a CUDA device; None otherwise (CPU, CI: our chunked function)."""
    if not hidden.is_cuda:
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy
