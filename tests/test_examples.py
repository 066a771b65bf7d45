"""Shared example processing: completion-only masks, truncation, bucketing, padding."""

from __future__ import annotations

import random

import numpy as np
import pytest

from trmlx.data import prepare_data
from trmlx.data.examples import (
    bucket_batches,
    collate_causal,
    collate_seq2seq,
    format_example,
    left_pad,
    padding_fraction,
    tokenize,
)
from trmlx.errors import UserError
from trmlx.recipe import load_recipe

ROWS = [{"source": "hello world", "target": "merhaba dünya"}, {"source": "the cat sat on the mat",
                                                               "target": "kedi paspasın üstüne oturdu"}]


def make(write, body="", task="causal", rows=ROWS):
    write("t.jsonl", rows)
    recipe = load_recipe(write("r.toml", f'task = "{task}"\n[model]\npath = "m"\n[data]\ntrain = "t.jsonl"\n'
                                         + body))
    return recipe, prepare_data(recipe).train


def test_template_and_prompt_target(write):
    recipe, records = make(write, 'template = "translate : {source}"\n')
    assert format_example(records[0], recipe) == ("translate : hello world", "merhaba dünya")


def test_completion_only_mask(write, tiny_tokenizer):
    recipe, records = make(write, 'template = "translate : {source}"\n')
    examples, stats = tokenize(records, recipe, tiny_tokenizer)
    tok = tiny_tokenizer
    first = examples[0]
    prompt = [tok.bos_token_id] + tok.convert_tokens_to_ids(["translate", ":", "hello", "world"])
    assert list(first.input_ids) == prompt + tok.convert_tokens_to_ids(["merhaba", "dünya"]) + [tok.eos_token_id]
    assert first.prompt_len == len(prompt)
    batch = collate_causal(examples, tok.pad_token_id)
    # The loss sees exactly the target tokens and EOS: 3 for the first example, 5 for the second.
    assert batch["mask"].sum(axis=1).tolist() == [3.0, 5.0]
    row = batch["targets"][0][batch["mask"][0] == 1].tolist()
    assert row == tok.convert_tokens_to_ids(["merhaba", "dünya"]) + [tok.eos_token_id]
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape
    assert not stats


def test_truncate_or_drop_policy(write, tiny_tokenizer):
    rows = [{"source": "bir iki üç dört beş", "target": "altı yedi sekiz dokuz on"},
            {"source": "bir iki üç dört beş altı yedi sekiz", "target": "on"}]
    recipe, records = make(write, "max_length = 8\n", rows=rows)
    examples, stats = tokenize(records, recipe, tiny_tokenizer)
    # Row 1 is cut to 8 tokens (loss on the 2 target tokens left); row 2's prompt fills the window: dropped.
    assert [len(e.input_ids) for e in examples] == [8] and examples[0].prompt_len == 6
    assert stats == {"truncated": 1, "dropped_too_long": 1}
    recipe, records = make(write, 'max_length = 8\ntoo_long = "drop"\n', rows=rows)
    examples, stats = tokenize(records, recipe, tiny_tokenizer, require_fit=False)
    assert examples == [] and stats == {"dropped_too_long": 2}
    with pytest.raises(UserError) as err:  # nothing left to train on: say so, with the numbers
        tokenize(records, recipe, tiny_tokenizer)
    assert err.value.problems == ["data.max_length = 8: none of the 2 train rows fits: the shortest prompt + target "
                                  "is 11 tokens; raise data.max_length to at least 11 or set data.too_long = "
                                  "\"truncate\""]


def test_seq2seq_examples_and_collate(write, tiny_tokenizer):
    rows = [{"input": "hello world", "target": "merhaba"}, {"input": "bir", "target": "iki üç"}]
    recipe, records = make(write, "", task="seq2seq", rows=rows)
    examples, _ = tokenize(records, recipe, tiny_tokenizer)
    batch = collate_seq2seq(examples, tiny_tokenizer.pad_token_id, decoder_start_id=0)
    assert batch["decoder_inputs"][:, 0].tolist() == [0, 0]
    assert batch["decoder_inputs"][1, 1:].tolist() == batch["targets"][1, :-1].tolist()
    assert batch["mask"].sum(axis=1).tolist() == [2.0, 3.0]
    assert batch["attention_mask"].sum(axis=1).tolist() == [3, 2]


def test_chat_formatting_needs_a_chat_template(write, tiny_tokenizer):
    recipe, records = make(write, "chat = true\n")
    with pytest.raises(UserError, match="chat formatting needs a tokenizer with a chat template"):
        tokenize(records, recipe, tiny_tokenizer)


def test_bucketing_cuts_padding_on_skewed_lengths():
    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(3.5, 0.8)) + 4 for _ in range(2000)]  # long tail, like real text
    bucketed = bucket_batches(lengths, batch_size=16, seed=0)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    unsorted = [order[i : i + 16] for i in range(0, len(order), 16)]
    assert sorted(i for b in bucketed for i in b) == list(range(2000))  # every example exactly once
    assert padding_fraction(bucketed, lengths) < 0.05 < 0.4 < padding_fraction(unsorted, lengths)
    assert bucket_batches(lengths, 16, seed=0) == bucketed  # seeded
    assert bucket_batches(lengths, 16, seed=1) != bucketed  # batch order shuffled by the seed


def test_left_pad_aligns_prompt_ends():
    ids, attention = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == np.int32
