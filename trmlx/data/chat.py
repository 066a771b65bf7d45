"""Multi-turn chat rows → token ids and the token spans that carry loss: every assistant turn is trained.

The ids come from ONE rendering of the whole conversation with the model's chat template, tokenised the way
`apply_chat_template(tokenize=True)` does it, so training sees exactly the template's tokens. Assistant spans are
found in that text (the template may add headers, trim content or prepend a default system message) and mapped to
tokens with the fast tokenizer's offsets; system and user turns and the template's headers carry no loss.
"""

from __future__ import annotations

import bisect
import os
from typing import Any, Sequence

from trmlx.errors import UserError

CHAT_ROLES = ("system", "user", "assistant")  # roles every chat template knows; tool turns need per-model fields


def conversation_problem(messages: Sequence[dict[str, Any]]) -> str | None:
    """Why a `messages` list cannot be trained on (unknown role, no assistant turn, ends with another role), or
    None. An empty list is an empty field, dropped and counted elsewhere."""
    for number, message in enumerate(messages, 1):
        if message["role"] not in CHAT_ROLES:
            return f"has role '{message['role']}' in message {number}; expected one of {', '.join(CHAT_ROLES)}"
    if messages and not any(m["role"] == "assistant" for m in messages):
        return "has no assistant turn: there is nothing to train on"
    if messages and messages[-1]["role"] != "assistant":
        return (f"ends with a '{messages[-1]['role']}' turn; the last turn must be the assistant's (it is the "
                "answer eval scores)")
    return None


def render_chat(messages: Sequence[dict[str, Any]], tokenizer: Any, origin: str,
                add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages`; a template that rejects them is a UserError naming the row."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{origin}: chat formatting needs a tokenizer with a chat template, and this model's "
                        "tokenizer has none; set data.chat = false and use data.template")
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # noqa: BLE001 - jinja's raise_exception (e.g. roles must alternate) is the reason
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{origin}: the model's chat template rejects this conversation: {first[:200]}") from None


def chat_prompt_ids(messages: Sequence[dict[str, Any]], tokenizer: Any, origin: str) -> list[int]:
    """Ids of `messages` followed by the template's assistant header: a prompt for a model trained on
    conversations, tokenised as encode_conversation tokenises them (no special tokens beyond the template's)."""
    text = render_chat(messages, tokenizer, origin, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_conversation(messages: Sequence[dict[str, Any]], tokenizer: Any,
                        origin: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole conversation and the [start, end) token spans that carry loss: each assistant
    message's content plus the text up to and including the first special token after it (the template's end of
    turn, which the model must learn to emit)."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{origin}: training on chat turns needs a fast tokenizer (for token offsets); "
                        f"{type(tokenizer).__name__} is not one")
    text = render_chat(messages, tokenizer, origin)
    spans = _assistant_char_spans(messages, text, tokenizer, origin)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    token_spans = _token_spans(offsets, spans)
    if not token_spans:
        raise UserError(f"{origin}: no token of the assistant turns was found in the chat template's output")
    return ids, token_spans


def _assistant_char_spans(messages: Sequence[dict[str, Any]], text: str, tokenizer: Any,
                          origin: str) -> list[tuple[int, int]]:
    """Character spans of each assistant turn in the rendered text. The search for turn k starts where the
    rendering of messages[:k] (with the generation prompt) stops agreeing with the whole text, so a content that
    also occurs earlier in the conversation is never matched there."""
    specials = sorted({t for t in tokenizer.all_special_tokens if t} | _added_special(tokenizer), key=len,
                      reverse=True)
    spans, cursor = [], 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(messages[:k], tokenizer, origin, add_generation_prompt=True) if k else ""
        after = render_chat(messages[: k + 1], tokenizer, origin)
        lower = max(cursor, len(os.path.commonprefix([before, text])))
        content = message["content"].strip()  # templates often trim (Llama 3's `| trim`)
        start = text.find(content, lower)
        if start < 0:
            raise UserError(f"{origin}: the chat template does not reproduce assistant message {k + 1} verbatim, "
                            "so its loss mask cannot be built; check the model's chat template")
        end = start + len(content)
        turn_end = len(os.path.commonprefix([after, text]))  # where this turn's rendering stops matching
        if turn_end <= end:  # a template that re-renders earlier turns: the turn runs to the next assistant header
            turn_end = len(text)
        spans.append((start, _end_of_turn(text, end, turn_end, specials)))
        cursor = spans[-1][1]
    return spans


def _end_of_turn(text: str, end: int, limit: int, specials: list[str]) -> int:
    """End of the first special token after the content (and before `limit`), else the content's end."""
    hits = [(at, -len(s)) for s in specials if 0 <= (at := text.find(s, end, limit))]
    return min(hits)[0] - min(hits)[1] if hits else end


def _added_special(tokenizer: Any) -> set[str]:
    """Added tokens flagged special (<|im_end|>, <|eot_id|>, <end_of_turn>), which all_special_tokens may omit."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {str(t) for t in decoder.values() if getattr(t, "special", False)}


def _token_spans(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token index ranges whose characters overlap a character span (a token straddling a boundary belongs to the
    span: the model must produce it). Offsets grow monotonically, so two bisections per span suffice."""
    starts, ends = [s for s, _ in offsets], [e for _, e in offsets]
    out = []
    for start, end in spans:
        first, stop = bisect.bisect_right(ends, start), bisect.bisect_left(starts, end)
        if first < stop:
            out.append((first, stop))
    return out
