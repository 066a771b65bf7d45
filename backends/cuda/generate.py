"""Batched generation with transformers: left-padded prompts, KV cache, the same settings as the MLX backend."""

from __future__ import annotations

import threading
from queue import Queue
from typing import Iterator, Sequence

import torch

from trmlx.backend import GenerationSettings, LoadedModel
from trmlx.data.examples import left_pad

import trmlx.backends.cuda.virtual_tokens as virtual_tokens
from trmlx.backends.cuda.model import device
from trmlx.backends.cuda.train import autocast


def _generate_kwargs(loaded: LoadedModel, settings: GenerationSettings) -> dict:
    sampling = settings.temperature > 0
    kwargs = {"max_new_tokens": settings.max_new_tokens, "do_sample": sampling,
              "pad_token_id": loaded.tokenizer.pad_token_id, "eos_token_id": loaded.tokenizer.eos_token_id,
              "repetition_penalty": settings.repetition_penalty}
    if sampling:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
    else:  # greedy: clear sampling knobs a model's generation_config may carry, so they do not warn or apply
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def _seq2seq_prompt_tuned(model: torch.nn.Module) -> bool:
    return model.config.is_encoder_decoder and virtual_tokens.peft_type(model) == "PROMPT_TUNING"


@torch.no_grad()
def generate_tokens(loaded: LoadedModel, prompts: Sequence[Sequence[int]],
                    settings: GenerationSettings) -> list[list[int]]:
    """New token ids per prompt (EOS and padding removed), one batched `generate` call."""
    if _seq2seq_prompt_tuned(loaded.model) and len({len(p) for p in prompts}) > 1:
        # peft puts a T5's soft prompt before the left padding, so the padding changes the prompt's relative
        # distance to the real tokens (T5's position bias) and the greedy text diverges: batch only prompts of
        # equal length, which need no padding.
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        results: dict[int, list[int]] = {}
        for indices in by_length.values():
            for i, tokens in zip(indices, generate_tokens(loaded, [prompts[i] for i in indices], settings)):
                results[i] = tokens
        return [results[i] for i in range(len(prompts))]
    ids, attention = left_pad(prompts, loaded.tokenizer.pad_token_id)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    model = loaded.model
    eos = loaded.tokenizer.eos_token_id
    input_ids = torch.from_numpy(ids).long().to(device())
    input_mask = torch.from_numpy(attention).long().to(device())
    was_training = model.training
    model.eval()
    with autocast(loaded):
        if virtual_tokens.is_prompt_learning(model):  # peft's generate is not trusted here: see virtual_tokens
            out = virtual_tokens.generate_tokens(model, input_ids, input_mask, settings, eos)
        else:
            out = model.generate(input_ids=input_ids, attention_mask=input_mask, **_generate_kwargs(loaded, settings))
    model.train(was_training)
    if isinstance(out, list):
        return out
    results = []
    # A decoder-only model returns prompt + new tokens; an encoder-decoder returns decoder_start + new tokens.
    first_new = 1 if model.config.is_encoder_decoder else ids.shape[1]
    for row in out[:, first_new:].tolist():
        results.append(row[: row.index(eos)] if eos in row else row)
    return results


def stream_tokens(loaded: LoadedModel, prompt: Sequence[int], settings: GenerationSettings) -> Iterator[int]:
    """Token ids of one completion as they are produced (generate runs in a thread, feeding a queue)."""
    from transformers.generation.streamers import BaseStreamer

    queue: Queue = Queue()
    done = object()

    class _Ids(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # the first call carries the prompt
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                queue.put(token)

        def end(self) -> None:
            queue.put(done)

    def run() -> None:
        try:
            with torch.no_grad(), autocast(loaded):
                loaded.model.generate(input_ids=torch.tensor([list(prompt)], device=device()),
                                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device()),
                                      streamer=_Ids(), **_generate_kwargs(loaded, settings))
        finally:
            queue.put(done)

    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    if virtual_tokens.is_prompt_learning(loaded.model):
        with torch.no_grad(), autocast(loaded):
            yield from virtual_tokens.stream(loaded.model, prompt, settings, loaded.tokenizer.eos_token_id, device())
        return
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    eos = loaded.tokenizer.eos_token_id
    while (token := queue.get()) is not done:
        if token == eos:
            break
        yield token
    thread.join()
