"""Rows → token ids, decided once for both backends: prompt formatting, completion-only loss masks, truncation,
length-bucketed batching and padding. Backends receive numpy arrays and only turn them into tensors.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from trmlx.data.chat import encode_conversation, render_chat
from trmlx.data.fields import render as render_fields
from trmlx.data.prepare import Record
from trmlx.errors import UserError
from trmlx.recipe.schema import Recipe


@dataclass(frozen=True)
class Example:
    """One tokenised example. Causal: loss on input_ids[prompt_len:], or on the token `spans` of a multi-turn
    chat (every assistant turn; prompt_len is then where the first one starts). Seq2seq: input_ids → target_ids."""

    input_ids: tuple[int, ...]
    prompt_len: int = 0
    target_ids: tuple[int, ...] = ()
    task: str = ""
    spans: tuple[tuple[int, int], ...] = ()  # [start, end) token ranges that carry loss; () = input_ids[prompt_len:]

    @property
    def length(self) -> int:
        return len(self.input_ids) + len(self.target_ids)


def render(template: str, fields: dict[str, Any]) -> str:
    """Fill {column} and {nested.path} placeholders; the data layer has already checked that every one exists."""
    return render_fields(template, fields)


def format_example(record: Record, recipe: Recipe, tokenizer: Any = None) -> tuple[str, str]:
    """The (prompt, target) texts of a record: template or task prefix applied, chat template if asked for."""
    f, data = record.fields, recipe.data
    task = next((t for t in data.tasks if t.name == record.task), None)
    template = (task.template if task and task.template else data.template)
    prefix = task.prefix if task else ""
    if recipe.task == "seq2seq":
        return prefix + render(template or "{input}", f), f["target"]
    if "messages" in f:  # eval and generate: the conversation up to its last (assistant) turn, which is scored
        messages = list(f["messages"])
        return _chat_prompt(messages[:-1], tokenizer, record.origin), messages[-1]["content"]
    source_role = "prompt" if "prompt" in f else "source"
    target = f["completion"] if "completion" in f else f["target"]
    prompt = prefix + render(template or "{" + source_role + "}", f)
    if data.chat:
        messages = ([{"role": "system", "content": data.system_prompt}] if data.system_prompt else [])
        return _chat_prompt(messages + [{"role": "user", "content": prompt}], tokenizer, record.origin), target
    return prompt, target


def _chat_prompt(messages: list[dict[str, str]], tokenizer: Any, origin: str) -> str:
    return render_chat(messages, tokenizer, origin, add_generation_prompt=True)


def tokenize(records: Sequence[Record], recipe: Recipe, tokenizer: Any, split: str = "train",
             require_fit: bool = True) -> tuple[list[Example], Counter]:
    """Tokenise records with the recipe's truncation policy; returns examples and counts of what was cut.

    With `require_fit`, rows of which none fits data.max_length are an error that gives the numbers.
    """
    if tokenizer.eos_token_id is None:
        raise UserError(f"model.path: the tokenizer of {recipe.model.path} has no EOS token; training needs one "
                        "to teach the model to stop")
    examples, stats = [], Counter()
    data = recipe.data
    shortest = [10**9] * 3  # shortest prompt, target and prompt + target in tokens: the numbers for the error
    for record in records:
        if recipe.task == "causal" and "messages" in record.fields:
            ids, spans = encode_conversation(record.fields["messages"], tokenizer, record.origin)
            prompt_len, trained = spans[0][0], sum(e - s for s, e in spans)
            shortest = [min(a, b) for a, b in zip(shortest, (prompt_len, trained, len(ids)))]
            example = _fit_conversation(ids, spans, record.task, data.max_length, data.too_long, stats)
            if example:
                examples.append(example)
            continue
        prompt, target = format_example(record, recipe, tokenizer)
        prompt_ids = encode_prompt(prompt, tokenizer)
        target_ids = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
        shortest = [min(a, b) for a, b in zip(shortest, (len(prompt_ids), len(target_ids),
                                                         len(prompt_ids) + len(target_ids)))]
        if recipe.task == "seq2seq":
            long = len(prompt_ids) > data.max_length or len(target_ids) > data.max_target_length
            if long and data.too_long == "drop":
                stats["dropped_too_long"] += 1
                continue
            stats["truncated"] += long
            source = prompt_ids[: data.max_length]
            if len(prompt_ids) > data.max_length and tokenizer.eos_token_id in prompt_ids[-1:]:
                source[-1] = tokenizer.eos_token_id  # keep T5's closing EOS on truncated inputs
            examples.append(Example(tuple(source), 0, tuple(target_ids[: data.max_target_length]), record.task))
            continue
        ids = prompt_ids + target_ids
        if len(ids) > data.max_length:
            if data.too_long == "drop" or len(prompt_ids) >= data.max_length:
                stats["dropped_too_long"] += 1  # a prompt that fills the window leaves nothing to learn from
                continue
            stats["truncated"] += 1
            ids = ids[: data.max_length]
        examples.append(Example(tuple(ids), len(prompt_ids), (), record.task))
    if records and not examples and require_fit:
        raise UserError(_nothing_fits(recipe, len(records), split, *shortest))
    return examples, stats


def _fit_conversation(ids: list[int], spans: list[tuple[int, int]], task: str, max_length: int, too_long: str,
                      stats: Counter) -> Example | None:
    """A conversation cut to max_length like a single turn: dropped (counted) when the policy says so or when no
    assistant token is left inside the window, else truncated at the window with the spans clipped to it."""
    if len(ids) > max_length:
        if too_long == "drop" or spans[0][0] >= max_length:
            stats["dropped_too_long"] += 1
            return None
        stats["truncated"] += 1
        ids = ids[:max_length]
        spans = [(s, min(e, max_length)) for s, e in spans if s < max_length]
    return Example(tuple(ids), spans[0][0], (), task, tuple(spans))


def _nothing_fits(recipe: Recipe, rows: int, split: str, prompt: int, target: int, total: int) -> str:
    """Why every row was dropped at data.max_length, with the token counts needed to fix it."""
    data = recipe.data
    head = f"data.max_length = {data.max_length}: none of the {rows} {split} rows fits"
    if recipe.task == "seq2seq":
        return (f"{head} with too_long = \"drop\": the shortest input is {prompt} tokens, the shortest target "
                f"{target} (max_target_length {data.max_target_length}); raise the limits or set data.too_long = "
                "\"truncate\"")
    if data.too_long == "drop":
        return (f"{head}: the shortest prompt + target is {total} tokens; raise data.max_length to at least "
                f"{total} or set data.too_long = \"truncate\"")
    return (f"{head}: the shortest prompt is {prompt} tokens, which leaves no room for the target; raise "
            f"data.max_length above {prompt} (the shortest prompt + target is {total})")


def encode_prompt(prompt: str, tokenizer: Any) -> list[int]:
    """Prompt ids as training saw them (eval and generate reuse this): a chat template already holds BOS; plain
    text gets the tokenizer's usual special tokens."""
    return tokenizer.encode(prompt, add_special_tokens=not _has_bos(prompt, tokenizer))


def _has_bos(text: str, tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def bucket_batches(lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True) -> list[list[int]]:
    """Sort indices by real token count, cut into batches, shuffle the batch order with the seed.

    Neighbours in length share a batch, so little compute is spent on padding; the order of batches stays random.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        random.Random(seed).shuffle(batches)
    return batches


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of padded positions when each batch is padded to its longest member."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / padded if padded else 0.0


def collate(examples: Sequence[Example], pad_id: int, decoder_start_id: int | None = None) -> dict[str, np.ndarray]:
    """The batch a backend trains on: seq2seq when the examples carry target ids, else causal."""
    if examples[0].target_ids:
        if decoder_start_id is None:
            raise ValueError("seq2seq batches need the model's decoder_start_token_id")
        return collate_seq2seq(examples, pad_id, decoder_start_id)
    return collate_causal(examples, pad_id)


PAD_MULTIPLE = 8  # batch widths are rounded up to this: few compiled shapes (MLX), tensor-core friendly (CUDA)


def round_up(n: int) -> int:
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def collate_causal(examples: Sequence[Example], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded next-token batch: inputs, targets and a loss mask that is 1 only on target tokens."""
    width = round_up(max(len(e.input_ids) for e in examples) - 1) + 1  # inputs/targets are width - 1 long
    ids = np.full((len(examples), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), width), dtype=np.float32)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = e.input_ids
        for start, end in e.spans or ((e.prompt_len, len(e.input_ids)),):
            mask[row, start:end] = 1.0
    # Position t predicts token t+1, so the mask moves one to the left with the targets.
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": mask[:, 1:]}


def with_loss_rows(batch: dict[str, np.ndarray], chunk: int) -> dict[str, np.ndarray]:
    """The batch plus what a chunked loss runs the output head over: the flat positions that carry a loss (prompt
    and padding positions need no logits) as (chunks, rows) `loss_rows`, padded with the last position, and their
    `loss_weights` (the mask's, 0 on padding rows). A batch with fewer target tokens than `chunk` is one chunk,
    rounded up to 64 rows so few shapes occur (MLX compiles one graph per shape)."""
    if not chunk:
        return batch
    mask = batch["mask"].reshape(-1)
    rows = np.flatnonzero(mask != 0).astype(np.int32)  # != 0, not > 0: a NaN weight must still reach the loss
    chunk = max(1, min(chunk, -(-max(len(rows), 1) // 64) * 64))
    pad = -len(rows) % chunk or (chunk if len(rows) == 0 else 0)
    padded = np.concatenate([rows, np.full(pad, rows[-1] if len(rows) else 0, dtype=np.int32)])
    weights = np.concatenate([mask[rows], np.zeros(pad, dtype=np.float32)]).astype(np.float32)
    return {**batch, "loss_rows": padded.reshape(-1, chunk), "loss_weights": weights.reshape(-1, chunk)}


def collate_seq2seq(examples: Sequence[Example], pad_id: int, decoder_start_id: int) -> dict[str, np.ndarray]:
    """Encoder inputs with attention mask; decoder inputs start with decoder_start_id; targets masked at padding."""
    n = len(examples)
    src_w = round_up(max(len(e.input_ids) for e in examples))
    tgt_w = round_up(max(len(e.target_ids) for e in examples))
    inputs = np.full((n, src_w), pad_id, dtype=np.int32)
    attention = np.zeros((n, src_w), dtype=np.int32)
    targets = np.full((n, tgt_w), pad_id, dtype=np.int32)
    mask = np.zeros((n, tgt_w), dtype=np.float32)
    for row, e in enumerate(examples):
        inputs[row, : len(e.input_ids)] = e.input_ids
        attention[row, : len(e.input_ids)] = 1
        targets[row, : len(e.target_ids)] = e.target_ids
        mask[row, : len(e.target_ids)] = 1.0
    decoder_inputs = np.concatenate([np.full((n, 1), decoder_start_id, dtype=np.int32), targets[:, :-1]], axis=1)
    return {"inputs": inputs, "attention_mask": attention, "decoder_inputs": decoder_inputs, "targets": targets,
            "mask": mask}


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids and attention mask for batched generation (all prompts end at the same column)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int32)
    attention = np.zeros((len(prompts), width), dtype=np.int32)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p) :] = p
            attention[row, width - len(p) :] = 1
    return ids, attention
