"""Batched generation for MLX: left-padded prompts share one KV cache (mlx-lm's BatchKVCache), so a batch of 16
costs about as many forward passes as one prompt, and each row's result equals its one-at-a-time result.

mlx-lm's BatchKVCache keeps a per-row position offset and masks the left padding, so RoPE positions and attention
see exactly what an unpadded prompt would. Sampling and repetition penalty are mlx-lm's own pieces.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import (
    ArraysCache,
    BatchKVCache,
    BatchRotatingKVCache,
    CacheList,
    KVCache,
    RotatingKVCache,
    make_prompt_cache,
)
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from trmlx.backend import GenerationSettings, LoadedModel
from trmlx.data.examples import left_pad
from trmlx.errors import UserError

PREFILL_STEP = 512  # prompt columns per forward pass while filling the cache (bounds activation memory)


def eos_ids(loaded: LoadedModel) -> set[int]:
    """Token ids that end a sequence: the tokenizer's EOS plus the model config's (chat models often add one)."""
    ids = {loaded.tokenizer.eos_token_id}
    config_eos = loaded.handle.get("config", {}).get("eos_token_id")
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return {int(i) for i in ids if i is not None}


def generate_tokens(loaded: LoadedModel, prompts: Sequence[Sequence[int]], settings: GenerationSettings,
                    seed: int | None = None) -> list[list[int]]:
    """New token ids per prompt (EOS excluded), all prompts decoded together as one batch."""
    results: list[list[int]] = [[] for _ in prompts]
    if not prompts:
        return results
    for rows, tokens in _decode(loaded, prompts, settings, seed):
        for row, token in zip(rows, tokens):
            results[row].append(token)
    return results


def stream_tokens(loaded: LoadedModel, prompt: Sequence[int], settings: GenerationSettings,
                  seed: int | None = None) -> Iterator[int]:
    """Yield one prompt's new token ids as soon as each is produced (EOS excluded), for streaming output."""
    for _, tokens in _decode(loaded, [prompt], settings, seed):
        yield tokens[0]


def _decode(loaded: LoadedModel, prompts: Sequence[Sequence[int]], settings: GenerationSettings,
            seed: int | None) -> Iterator[tuple[list[int], list[int]]]:
    """Yield (prompt indices, their new tokens) per step; finished rows leave the batch (and its cache).

    The next step is queued (mx.async_eval) before the current tokens are read, so the device computes step t+1
    while Python inspects step t; a row that finished meanwhile is dropped from that queued step's result.
    """
    if any(len(p) == 0 for p in prompts):
        raise UserError("generate: a prompt encoded to zero tokens; give some text to continue from")
    if settings.max_new_tokens < 1:
        return
    if seed is not None:
        mx.random.seed(seed)
    model = loaded.model
    was_training = model.training
    model.eval()  # no dropout while generating
    try:
        stop = eos_ids(loaded)
        step = _Stepper(loaded, prompts, settings)
        tokens = step.prefill()
        mx.async_eval(tokens)
        active = list(range(len(prompts)))
        for produced in range(1, settings.max_new_tokens + 1):
            queued = step.next(tokens) if produced < settings.max_new_tokens else None
            if queued is not None:
                mx.async_eval(queued)
            values = tokens.tolist()
            keep = [row for row, token in enumerate(values) if token not in stop]
            emitted = [active[row] for row in keep]
            if emitted:
                yield emitted, [values[row] for row in keep]
            if queued is None or not keep:
                return
            if len(keep) < len(active):
                step.keep(keep)
                queued = queued[mx.array(keep)]
                active = emitted
            tokens = queued
    finally:
        model.train(was_training)


class _Stepper:
    """One batch's cache, sampler and (optional) repetition-penalty histories; every method stays lazy."""

    def __init__(self, loaded: LoadedModel, prompts: Sequence[Sequence[int]], settings: GenerationSettings):
        self.model = loaded.model
        pad_id = loaded.tokenizer.pad_token_id
        ids, attention = left_pad(prompts, 0 if pad_id is None else pad_id)
        self.ids = ids
        padding = (attention.shape[1] - attention.sum(axis=1)).tolist()
        # Prompt/prefix tuning (virtual_tokens.VirtualTokenModel) start every row's cache with the virtual tokens.
        make_batch_cache = getattr(self.model, "make_batch_cache", None)
        self.cache = (make_batch_cache(padding) if make_batch_cache is not None
                      else [_batched(c, padding) for c in make_prompt_cache(self.model)])
        self.sampler = make_sampler(settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
        penalty = settings.repetition_penalty
        self.processors = make_logits_processors(repetition_penalty=penalty) if penalty != 1.0 else []
        # mlx-lm's penalty looks at the last 20 tokens of the row's own text: prompt (unpadded) + generated.
        self.history = [mx.array(np.asarray(p[:-1], dtype=np.int32)) for p in prompts] if self.processors else []

    def prefill(self) -> mx.array:
        """Fill the cache with all prompt columns but the last, then sample the first new token of every row."""
        body = self.ids[:, :-1]
        for start in range(0, body.shape[1], PREFILL_STEP):
            self.model(mx.array(body[:, start : start + PREFILL_STEP]), cache=self.cache)
            # Evaluating only the cache skips the logits of these columns entirely (vocab-sized, unused).
            mx.eval([c.state for c in self.cache])
        return self.next(mx.array(self.ids[:, -1]))

    def next(self, inputs: mx.array) -> mx.array:
        """Feed one token per row; return the next token per row."""
        logits = self.model(inputs[:, None], cache=self.cache)[:, -1, :]
        if self.processors:
            rows = []
            for row in range(logits.shape[0]):
                self.history[row] = mx.concatenate([self.history[row], inputs[row : row + 1].astype(mx.int32)])
                row_logits = logits[row : row + 1]
                for processor in self.processors:
                    row_logits = processor(self.history[row], row_logits)
                rows.append(row_logits)
            logits = mx.concatenate(rows, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return self.sampler(logprobs)

    def keep(self, rows: list[int]) -> None:
        """Drop finished rows from the cache (mlx-lm also trims the padding the survivors no longer need)."""
        for c in self.cache:
            c.filter(rows)
        if self.history:
            self.history = [self.history[r] for r in rows]


def _batched(cache: Any, padding: list[int]) -> Any:
    """The batched, left-padding-aware twin of one layer's single-sequence cache from make_prompt_cache."""
    if type(cache) is KVCache:
        return BatchKVCache(padding)
    if type(cache) is RotatingKVCache:
        return BatchRotatingKVCache(cache.max_size, padding)
    if type(cache) is ArraysCache:
        return ArraysCache(len(cache.cache), padding)
    if type(cache) is CacheList:
        return CacheList(*(_batched(c, padding) for c in cache.caches))
    raise UserError(f"generate: mlx-lm has no batched form of this model's {type(cache).__name__} cache, so the "
                    "MLX backend cannot generate with this model")
