"""Batched MLX generation on the tiny Llama: batched greedy equals one prompt at a time (and mlx-lm's own
single-prompt loop), EOS ends only its row, seeded sampling repeats, stop strings cut cleanly while streaming."""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core", reason="the MLX backend needs mlx (pip install 'trmlx[mlx]')")

from tests.conftest import REPO  # noqa: E402
from trmlx.backend import GenerationSettings, LoadedModel  # noqa: E402
from trmlx.evaluate import StreamDecoder, cut_at_stop  # noqa: E402
from trmlx.recipe import load_recipe  # noqa: E402

TEXTS = ["English: Good morning.\nTurkish: ",
         "English: I left my keys on the kitchen table.\nTurkish: ",
         "Merhaba",
         "English: A balanced diet includes fruit, vegetables, whole grains and protein.\nTurkish: ",
         "İstanbul'da ışık"]
GREEDY = GenerationSettings(max_new_tokens=12)


@pytest.fixture(scope="module")
def loaded():
    from trmlx.backends.mlx import create_backend

    return create_backend().load(load_recipe(REPO / "recipes" / "quickstart.toml"))


@pytest.fixture(scope="module")
def prompts(loaded):
    return [loaded.tokenizer.encode(t) for t in TEXTS]


def with_eos(loaded: LoadedModel, *extra: int) -> LoadedModel:
    """The same model with more end-of-sequence ids (as a chat model's config adds them)."""
    return LoadedModel(loaded.model, loaded.tokenizer, {**loaded.handle, "config": {"eos_token_id": [2, *extra]}})


def mlx_lm_greedy(model, prompt: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    from mlx_lm.generate import generate_step

    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        if token in eos:
            break
        out.append(token)
    return out


def test_batched_greedy_equals_one_prompt_at_a_time(loaded, prompts):
    from trmlx.backends.mlx.generate import generate_tokens

    assert len({len(p) for p in prompts}) == len(prompts)  # every row gets a different amount of left padding
    batched = generate_tokens(loaded, prompts, GREEDY)
    single = [generate_tokens(loaded, [p], GREEDY)[0] for p in prompts]
    assert batched == single
    assert batched == [mlx_lm_greedy(loaded.model, p, 12, {2}) for p in prompts]
    assert all(len(t) == 12 for t in batched)  # random weights never say EOS: the budget ends every row


def test_eos_ends_only_its_row(loaded, prompts):
    from trmlx.backends.mlx.generate import generate_tokens, stream_tokens

    full = generate_tokens(loaded, prompts, GREEDY)
    eos = full[1][4]  # a token the second row emits mid-way; other rows may emit it too, at other steps
    stopped = with_eos(loaded, eos)
    expected = [row[: row.index(eos)] if eos in row else row for row in full]
    assert expected[1] == full[1][:4]
    assert generate_tokens(stopped, prompts, GREEDY) == expected
    assert list(stream_tokens(stopped, prompts[1], GREEDY)) == expected[1]
    assert generate_tokens(with_eos(loaded, full[0][0]), prompts[:1], GREEDY) == [[]]


def test_repetition_penalty_batched_equals_single(loaded, prompts):
    from trmlx.backends.mlx.generate import generate_tokens

    settings = GenerationSettings(max_new_tokens=10, repetition_penalty=1.5)
    penalised = generate_tokens(loaded, prompts, settings)
    assert penalised == [generate_tokens(loaded, [p], settings)[0] for p in prompts]
    assert penalised != generate_tokens(loaded, prompts, GenerationSettings(max_new_tokens=10))


def test_seeded_sampling_is_reproducible(loaded, prompts):
    from trmlx.backends.mlx.generate import generate_tokens, stream_tokens

    settings = GenerationSettings(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1)
    first = generate_tokens(loaded, prompts, settings, seed=7)
    assert generate_tokens(loaded, prompts, settings, seed=7) == first
    assert generate_tokens(loaded, prompts, settings, seed=8) != first
    assert first != generate_tokens(loaded, prompts, GREEDY)
    assert list(stream_tokens(loaded, prompts[2], settings, seed=3)) == \
        generate_tokens(loaded, prompts[2:3], settings, seed=3)[0]


def test_stop_strings_cut_and_streaming_prints_whole_characters(loaded):
    tokenizer = loaded.tokenizer
    assert cut_at_stop("bir iki. üç\ndört", ["\n", "."]) == "bir iki"
    assert cut_at_stop("bir iki", ["", "x"]) == "bir iki"
    text = "Çiğdem ışığı gördü.\n\nİkinci paragraf"
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = StreamDecoder(tokenizer, ["\n\n"])
    pieces = []
    for token in ids:
        pieces.append(decoder.push(token))
        if decoder.stopped:
            break
    pieces.append(decoder.flush())
    assert "".join(pieces) == "Çiğdem ışığı gördü."
    assert not any("\ufffd" in p for p in pieces)
    assert decoder.stopped and len(decoder.ids) < len(ids)
    # A lone "\n" is held back (it may start "\n\n") and released when the stream ends without the stop string.
    tail = StreamDecoder(tokenizer, ["\n\n"])
    assert "".join(tail.push(t) for t in tokenizer.encode("gördü.\n", add_special_tokens=False)) == "gördü."
    assert tail.flush() == "\n"
