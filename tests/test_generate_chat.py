"""`trmlx generate RECIPE -p TEXT` on a recipe trained on conversations (`messages` rows): the prompt goes to the
model as a user turn through its chat template, as training rendered the conversations, on both backends; plain
text recipes and --raw send the text as before."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from tests.test_chat import CHATS, TINY_LLAMA, chat_files, template_ids
from trmlx.data import prepare_data
from trmlx.data.examples import encode_prompt, tokenize
from trmlx.data.prepare import trains_on_conversations
from trmlx.recipe import load_recipe

TEXT = "Türkiye'nin başkenti neresi?"
BACKENDS = {"mlx": ("mlx.core", "trmlx.backends.mlx", "MLXBackend"),
            "cuda": ("torch", "trmlx.backends.cuda", "CUDABackend")}


@pytest.fixture(scope="module")
def llama_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_LLAMA)


@pytest.fixture
def seen(monkeypatch):
    """The prompt ids each backend's generator is handed (the real generator still runs)."""
    import importlib

    prompts: list[list[int]] = []

    def patch(backend: str) -> list[list[int]]:
        requirement, module, name = BACKENDS[backend]
        pytest.importorskip(requirement)
        cls = getattr(importlib.import_module(module), name)
        original = cls.stream

        def stream(self, loaded, prompt, settings):
            prompts.append(list(prompt))
            return original(self, loaded, prompt, settings)

        monkeypatch.setattr(cls, "stream", stream)
        return prompts

    return patch


def plain_files(write):
    write("pairs.jsonl", [{"source": "Merhaba", "target": "Hello"}, {"source": "Kedi", "target": "Cat"}])
    return write("plain.toml", f'task = "causal"\n[model]\npath = "{TINY_LLAMA}"\n[data]\ntrain = "pairs.jsonl"\n')


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_a_chat_recipe_sends_the_prompt_as_a_user_turn(backend, cli, write, seen, llama_tokenizer):
    prompts = seen(backend)
    recipe = chat_files(write, CHATS)
    result = cli("generate", str(recipe), "-p", TEXT, "--backend", backend, "--max-tokens", "2")
    assert result.exit_code == 0, result.output
    turn = [{"role": "user", "content": TEXT}]
    assert prompts == [template_ids(llama_tokenizer, turn, add_generation_prompt=True)]
    # ... which is exactly the prefix training saw before an assistant answer to that user turn
    write("one.jsonl", [{"messages": turn + [{"role": "assistant", "content": "Ankara."}]}])
    one = load_recipe(write("one.toml", f'task = "causal"\n[model]\npath = "{TINY_LLAMA}"\n[data]\n'
                                        'train = "one.jsonl"\n'))
    (example,), _ = tokenize(prepare_data(one).train, one, llama_tokenizer)
    assert prompts[0] == list(example.input_ids[: example.spans[0][0]])
    assert llama_tokenizer.decode(prompts[0]) == f"<s><|user|>\n{TEXT}</s>\n<|assistant|>\n"


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_plain_text_recipes_and_raw_prompts_are_unchanged(backend, cli, write, seen, llama_tokenizer):
    prompts = seen(backend)
    for recipe, extra in ((plain_files(write), ()), (chat_files(write, CHATS), ("--raw",))):
        result = cli("generate", str(recipe), "-p", TEXT, "--backend", backend, "--max-tokens", "2", *extra)
        assert result.exit_code == 0, result.output
    plain = encode_prompt(TEXT, llama_tokenizer)
    assert plain == llama_tokenizer.encode(TEXT) and plain[0] == llama_tokenizer.bos_token_id
    assert prompts == [plain, plain]


def test_which_recipes_train_on_conversations(write, tmp_path):
    chat = load_recipe(chat_files(write, CHATS))
    assert trains_on_conversations(chat)
    assert not trains_on_conversations(load_recipe(plain_files(write)))
    renamed = [{"dialog": m} for m in CHATS]
    write("renamed.jsonl", renamed)
    mapped = write("mapped.toml", f'task = "causal"\n[model]\npath = "{TINY_LLAMA}"\n[data]\ntrain = '
                                  '"renamed.jsonl"\ncolumns = { messages = "dialog" }\n')
    assert trains_on_conversations(load_recipe(mapped))
    seq2seq = write("t5.toml", f'task = "seq2seq"\n[model]\npath = "{REPO / "recipes/models/tiny-mt5-tr"}"\n'
                               f'[data]\ntrain = "{REPO / "recipes/data/en_tr/train.jsonl"}"\n'
                               'columns = { input = "source" }\n')
    assert not trains_on_conversations(load_recipe(seq2seq))
    (tmp_path / "chat.jsonl").unlink()  # data gone from this machine: generate still works, as plain text
    assert not trains_on_conversations(chat)
