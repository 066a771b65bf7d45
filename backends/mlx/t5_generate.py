"""Batched greedy decoding for the MLX T5 (t5.py): all rows start from decoder_start together and share one
KV cache; cross-attention keys and values are computed once per batch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from trmlx.backends.mlx.t5 import T5


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[mx.array, mx.array]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return mx.array(ids), mx.array(mask)


def generate_greedy(model: T5, input_ids: mx.array | Sequence[Sequence[int]], attention_mask: mx.array | None = None,
                    max_new_tokens: int = 64, decoder_start_id: int | None = None,
                    eos_id: int | Iterable[int] | None = None, pad_id: int | None = None) -> list[list[int]]:
    """Greedy decoding of a batch: new token ids per row, EOS excluded (as in trmlx's generate).

    input_ids: right-padded (B, S) with its attention_mask, or a list of token lists (padded here). All rows start
    from decoder_start_id together and share one KV cache; a finished row is fed pad tokens (invisible to the other
    rows) and decoding stops when every row has met EOS or after max_new_tokens."""
    args = model.args
    pad_id = args.pad_token_id if pad_id is None else pad_id
    if not isinstance(input_ids, mx.array):
        if attention_mask is None:
            input_ids, attention_mask = _right_pad(input_ids, pad_id)
        else:
            input_ids, attention_mask = mx.array(input_ids), mx.array(attention_mask)
    start = args.decoder_start_token_id if decoder_start_id is None else decoder_start_id
    eos = args.eos_token_id if eos_id is None else eos_id
    eos_set = {int(e) for e in ([eos] if isinstance(eos, int) else eos)}
    batch = input_ids.shape[0]
    results: list[list[int]] = [[] for _ in range(batch)]
    if max_new_tokens <= 0 or batch == 0:
        return results

    encoder_states = model.encode(input_ids, attention_mask)
    cache = model.make_cache()
    eos_array = mx.array(sorted(eos_set), dtype=mx.int32)

    def step(tokens: mx.array, finished: mx.array) -> tuple[mx.array, mx.array]:
        logits = model.decode(tokens[:, None], encoder_states, attention_mask, cache)[:, -1, :]
        chosen = mx.where(finished, pad_id, mx.argmax(logits, axis=-1).astype(mx.int32))
        return chosen, finished | (chosen[:, None] == eos_array[None, :]).any(axis=-1)

    tokens, finished = step(mx.full((batch,), start, dtype=mx.int32), mx.zeros((batch,), dtype=mx.bool_))
    mx.async_eval(tokens, finished)
    alive = [True] * batch
    for n in range(max_new_tokens):
        if n + 1 < max_new_tokens:  # queue the next step before reading this one (overlaps host and device)
            next_tokens, next_finished = step(tokens, finished)
            mx.async_eval(next_tokens, next_finished)
        for row, token in enumerate(tokens.tolist()):
            if alive[row]:
                if token in eos_set:
                    alive[row] = False
                else:
                    results[row].append(token)
        if not any(alive) or n + 1 == max_new_tokens:
            break
        tokens, finished = next_tokens, next_finished
    return results


def generate(loaded: Any, prompts: Sequence[Sequence[int]], settings: Any) -> list[list[int]]:
    """The MLX backend's seq2seq generation: batched greedy decoding with the KV cache (sampling is not
    implemented for T5 on MLX: a clear error instead of silently decoding greedily)."""
    from trmlx.errors import UserError

    if settings.temperature > 0 or settings.repetition_penalty != 1.0:
        raise UserError("eval.temperature / repetition_penalty: T5 generation on MLX is greedy only; set "
                        "temperature = 0 and repetition_penalty = 1 (or use --backend cuda)")
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        return generate_greedy(loaded.model, [list(p) for p in prompts], None, settings.max_new_tokens,
                               loaded.handle.get("decoder_start_id"), loaded.tokenizer.eos_token_id,
                               loaded.tokenizer.pad_token_id)
    finally:
        loaded.model.train(was_training)
