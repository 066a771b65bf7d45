"""Generation for peft prompt- and prefix-tuned causal LMs: our own decode loop over the base model.

Why not `PeftModel.generate`: peft injects the virtual tokens in `prepare_inputs_for_generation`, which finds the KV
cache under `model_kwargs["past_key_values"]`. transformers 5.24 renamed that key to `cache`, so with peft 0.21.2
every decode step looks like the prefill: prompt tuning prepends the virtual tokens again at every step, prefix
tuning decodes past the prefix, and the greedy text no longer equals what the model's own forward pass (the one the
loss is computed with) predicts. Here the virtual tokens enter the cache once, as in the MLX backend:

- prompt tuning: the n soft-prompt embeddings run through the frozen model at positions 0..n-1 (they attend only to
  themselves, so their keys/values are a fixed prefix);
- prefix tuning: the n per-layer keys/values are the cache, as stored (no RoPE on them, as in peft).

A batch is laid out [virtual tokens | left padding | prompt]; the padding is masked and each row's real tokens take
positions n, n+1, ... so a batched row decodes exactly as it does alone. Only public, long-stable pieces are used:
`get_prompt_embedding_to_save` (what peft saves), `DynamicCache.update`, the model's forward, and the logits
processors of `transformers.generation`.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator, Sequence

import torch

from trmlx.backend import GenerationSettings


def peft_type(model: torch.nn.Module) -> str:
    """The active peft adapter's type, e.g. 'PROMPT_TUNING'; '' for a model without one."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    return str(getattr(config, "peft_type", "")).rpartition(".")[2]


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """A decoder-only peft model whose active adapter is prompt or prefix tuning (seq2seq keeps peft's generate:
    its virtual tokens go through the encoder, which the cache rename does not touch)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    return peft_type(model) in ("PROMPT_TUNING", "PREFIX_TUNING")


def _cache_argument(base: torch.nn.Module) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def virtual_token_cache(model: torch.nn.Module, batch: int) -> tuple[Any, int]:
    """A DynamicCache holding the adapter's n virtual tokens for `batch` rows, and n."""
    from transformers import DynamicCache

    adapter = getattr(model, "active_adapter", "default")
    config = model.peft_config[adapter]
    base = model.get_base_model()
    device = next(base.parameters()).device
    n = int(config.num_virtual_tokens)
    weights = model.get_prompt_embedding_to_save(adapter).to(device)  # (n, hidden) or (n, layers*2*kv_dim)
    cache = DynamicCache()
    if peft_type(model) == "PREFIX_TUNING":
        layers, kv_heads = int(config.num_layers), int(config.num_attention_heads)
        head_dim = int(config.token_dim) // kv_heads
        # peft's layout: (n, layers*2, kv_heads, head_dim) → per layer key at 2l and value at 2l+1.
        kv = weights.view(n, 2 * layers, kv_heads, head_dim).permute(1, 2, 0, 3).to(base.dtype)
        for layer in range(layers):
            keys, values = (kv[2 * layer + i].unsqueeze(0).expand(batch, -1, -1, -1).contiguous() for i in (0, 1))
            cache.update(keys, values, layer)
    else:
        embeds = weights.to(base.get_input_embeddings().weight.dtype).unsqueeze(0).expand(batch, -1, -1)
        positions = torch.arange(n, device=device).unsqueeze(0).expand(batch, -1)
        base(inputs_embeds=embeds, position_ids=positions, use_cache=True, **{_cache_argument(base): cache})
    return cache, n


def _processors(settings: GenerationSettings):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    steps = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        steps.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.temperature > 0:
        steps.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            steps.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            steps.append(TopPLogitsWarper(settings.top_p))
    return steps


@torch.no_grad()
def decode(model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor, settings: GenerationSettings,
           eos_id: int) -> Iterator[list[int | None]]:
    """Yield one token per row per step (None for rows that already ended), EOS excluded, for left-padded ids."""
    base = model.get_base_model()
    batch = ids.shape[0]
    cache, n = virtual_token_cache(model, batch)
    cache_kw = {_cache_argument(base): cache}
    mask = torch.cat([torch.ones(batch, n, dtype=attention.dtype, device=ids.device), attention], dim=1)
    positions = n + (attention.cumsum(dim=1) - 1).clamp(min=0)  # each row's real tokens start at n
    processors = _processors(settings)
    history = ids  # what the repetition penalty looks at, as in transformers' generate
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    logits = base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kw).logits
    for _ in range(settings.max_new_tokens):
        scores = processors(history, logits[:, -1].float())
        if settings.temperature > 0:
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
        else:
            token = scores.argmax(dim=-1)
        done = done | (token == eos_id)
        yield [None if d else int(t) for t, d in zip(token.tolist(), done.tolist())]
        if bool(done.all()):
            return
        history = torch.cat([history, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        positions = positions[:, -1:] + 1
        logits = base(input_ids=token[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                      **cache_kw).logits


def generate_tokens(model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor,
                    settings: GenerationSettings, eos_id: int) -> list[list[int]]:
    """New token ids per row (EOS excluded) for a left-padded batch."""
    results: list[list[int]] = [[] for _ in range(ids.shape[0])]
    ended = [False] * ids.shape[0]
    for step in decode(model, ids, attention, settings, eos_id):
        for row, token in enumerate(step):
            ended[row] = ended[row] or token is None
            if not ended[row]:
                results[row].append(token)
    return results


def stream(model: torch.nn.Module, prompt: Sequence[int], settings: GenerationSettings, eos_id: int,
           device: torch.device) -> Iterator[int]:
    """One prompt's new token ids as they are produced (EOS excluded)."""
    ids = torch.tensor([list(prompt)], device=device)
    for (token,) in decode(model, ids, torch.ones_like(ids), settings, eos_id):
        if token is None:
            return
        yield token
