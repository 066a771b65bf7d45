"""Multi-turn chat rows: every assistant turn trained, masks checked token for token against the chat template,
bad conversations rejected with file:line, and the same first losses on both backends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import REPO
from trmlx.data import prepare_data
from trmlx.data.examples import Example, collate_causal, encode_prompt, format_example, tokenize
from trmlx.errors import UserError
from trmlx.recipe import load_recipe

TINY_LLAMA = REPO / "recipes" / "models" / "tiny-llama-tr"
TWO_TURNS = [{"role": "system", "content": "Kısa cevap ver."}, {"role": "user", "content": "Merhaba!"},
             {"role": "assistant", "content": "Merhaba, nasılsın?"}, {"role": "user", "content": "İyiyim, sen?"},
             {"role": "assistant", "content": "Ben de iyiyim."}]
CHATS = [TWO_TURNS,
         [{"role": "user", "content": "Türkiye'nin başkenti neresi?"}, {"role": "assistant", "content": "Ankara."},
          {"role": "user", "content": "Peki en büyük şehri?"}, {"role": "assistant", "content": "İstanbul."}],
         [{"role": "user", "content": "2 artı 2 kaç eder?"}, {"role": "assistant", "content": "Dört."}],
         [{"role": "user", "content": "Bir renk söyle."}, {"role": "assistant", "content": "Mavi."},
          {"role": "user", "content": "Bir tane daha."}, {"role": "assistant", "content": "Kırmızı."}]]


@pytest.fixture(scope="module")
def llama_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_LLAMA)


def chat_files(write, chats, body=""):
    write("chat.jsonl", [{"messages": m} for m in chats])
    return write("r.toml", f'task = "causal"\n[model]\npath = "{TINY_LLAMA}"\n[data]\ntrain = "chat.jsonl"\n{body}')


def chat_recipe(write, chats, body=""):
    return load_recipe(chat_files(write, chats, body))


def template_ids(tokenizer, messages, **kw):
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


def test_every_assistant_turn_carries_loss_and_nothing_else(write, llama_tokenizer):
    recipe = chat_recipe(write, [TWO_TURNS])
    (example,), _ = tokenize(prepare_data(recipe).train, recipe, llama_tokenizer)
    assert list(example.input_ids) == template_ids(llama_tokenizer, TWO_TURNS)  # one rendering, the template's
    # Each turn starts where the template's generation prompt for it ends, and runs through its closing </s>.
    starts = [len(template_ids(llama_tokenizer, TWO_TURNS[:k], add_generation_prompt=True)) for k in (2, 4)]
    assert example.spans == ((starts[0], 56), (starts[1], 91)) == ((43, 56), (82, 91))
    trained = [list(example.input_ids[s:e]) for s, e in example.spans]
    assert trained == [[48, 262, 75, 346, 68, 15, 308, 298, 384, 86, 281, 34, 2],
                       [37, 267, 735, 224, 315, 315, 331, 17, 2]]
    for ids, message in zip(trained, (TWO_TURNS[2], TWO_TURNS[4])):
        assert ids == llama_tokenizer.encode(message["content"], add_special_tokens=False) + [2]  # content + EOS
    batch = collate_causal([example], pad_id=0)
    n = len(example.input_ids)
    loss_targets = batch["targets"][0][batch["mask"][0] == 1].tolist()
    assert loss_targets == trained[0] + trained[1]
    masked = [int(t) for t, m in zip(batch["targets"][0][: n - 1], batch["mask"][0][: n - 1]) if m == 0]
    assert masked == list(example.input_ids[1:43]) + list(example.input_ids[56:82]) + [202]  # system, user, "\n"


def test_eval_prompt_is_the_training_prefix_of_the_last_turn(write, llama_tokenizer):
    recipe = chat_recipe(write, [TWO_TURNS])
    (record,) = prepare_data(recipe).train
    (example,), _ = tokenize([record], recipe, llama_tokenizer)
    prompt, target = format_example(record, recipe, llama_tokenizer)
    assert encode_prompt(prompt, llama_tokenizer) == list(example.input_ids[: example.spans[-1][0]])
    assert target == record.reference() == "Ben de iyiyim."


def test_single_turn_batches_are_unchanged_by_spans():
    plain = collate_causal([Example((1, 5, 6, 7, 2), 2), Example((1, 8, 2), 1)], pad_id=0)
    spanned = collate_causal([Example((1, 5, 6, 7, 2), 2, spans=((2, 5),)), Example((1, 8, 2), 1)], pad_id=0)
    for key in plain:
        assert np.array_equal(plain[key], spanned[key]) and plain[key].dtype == spanned[key].dtype
    assert plain["mask"][0].tolist()[:5] == [0, 1, 1, 1, 0]


@pytest.mark.parametrize(("too_long", "expected"), [("truncate", ((43, 56), (82, 85))), ("drop", None)])
def test_a_long_conversation_is_cut_inside_a_turn_or_dropped(write, llama_tokenizer, too_long, expected):
    recipe = chat_recipe(write, [TWO_TURNS, CHATS[2]], f'max_length = 85\ntoo_long = "{too_long}"\n')
    examples, stats = tokenize(prepare_data(recipe).train, recipe, llama_tokenizer)
    if expected is None:
        assert len(examples) == 1 and stats["dropped_too_long"] == 1
    else:
        assert examples[0].spans == expected and len(examples[0].input_ids) == 85 and stats["truncated"] == 1


def test_trimming_template_with_a_default_system_message(write, llama_tokenizer):
    """Llama 3 trims contents and Qwen adds a system message the data lacks: spans are found in the text all the
    same, the template's headers stay masked."""
    tokenizer = llama_tokenizer.__class__.from_pretrained(TINY_LLAMA)
    tokenizer.chat_template = (
        "{{ bos_token }}"
        "{% if messages[0]['role'] != 'system' %}<|system|>\nSen yardımcısın.{{ eos_token }}{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>\n\n{{ m['content'] | trim }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n\n{% endif %}")
    chat = [{"role": "user", "content": " Ankara? "}, {"role": "assistant", "content": "  Başkent.\n"},
            {"role": "user", "content": "Başkent"}, {"role": "assistant", "content": "Evet"}]
    recipe = chat_recipe(write, [chat])
    (example,), _ = tokenize(prepare_data(recipe).train, recipe, tokenizer)
    assert list(example.input_ids) == template_ids(tokenizer, chat)
    assert [tokenizer.decode(example.input_ids[s:e]) for s, e in example.spans] == ["Başkent.</s>", "Evet</s>"]


def test_chatml_turns_end_at_their_own_special_token(write, llama_tokenizer):
    """Qwen's ChatML closes turns with <|im_end|>, an added special token that is not EOS: it is the turn's end."""
    tokenizer = llama_tokenizer.__class__.from_pretrained(TINY_LLAMA)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    recipe = chat_recipe(write, [CHATS[1]])
    (example,), _ = tokenize(prepare_data(recipe).train, recipe, tokenizer)
    assert list(example.input_ids) == template_ids(tokenizer, CHATS[1])
    assert [tokenizer.decode(example.input_ids[s:e]) for s, e in example.spans] == ["Ankara.<|im_end|>",
                                                                                   "İstanbul.<|im_end|>"]


def test_a_template_that_rejects_the_conversation_names_the_row(write, llama_tokenizer):
    tokenizer = llama_tokenizer.__class__.from_pretrained(TINY_LLAMA)
    tokenizer.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                               "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                               "{{ m['content'] }}{{ eos_token }}{% endfor %}")
    chat = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    path = chat_files(write, [chat])
    recipe = load_recipe(path)
    with pytest.raises(UserError) as err:
        tokenize(prepare_data(recipe).train, recipe, tokenizer)
    assert str(err.value) == (f"{path.parent / 'chat.jsonl'}:1: the model's chat template rejects this "
                              "conversation: roles must alternate user/assistant")


BAD = [
    ([{"role": "user", "content": "Merhaba"}, {"role": "assistant", "content": "Selam"},
      {"role": "user", "content": "Nasılsın?"}],
     "field 'messages' ends with a 'user' turn; the last turn must be the assistant's (it is the answer eval scores)"),
    ([{"role": "user", "content": "Merhaba"}, {"role": "bot", "content": "Selam"}],
     "field 'messages' has role 'bot' in message 2; expected one of system, user, assistant"),
    ([{"role": "system", "content": "Kısa."}, {"role": "user", "content": "Merhaba"}],
     "field 'messages' has no assistant turn: there is nothing to train on"),
]


@pytest.mark.parametrize(("chat", "reason"), BAD, ids=["ends-with-user", "unknown-role", "no-assistant"])
def test_bad_conversations_are_file_line_errors(cli, write, tmp_path, chat, reason):
    result = cli("check", str(chat_files(write, [CHATS[2], chat])), "--no-tokenizer")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'chat.jsonl'}:2: {reason}"]
    assert "Traceback" not in result.output


def test_blank_assistant_turn_is_an_empty_field_dropped_and_shown(cli, write):
    blank = [{"role": "user", "content": "Merhaba"}, {"role": "assistant", "content": "  "}]
    result = cli("check", str(chat_files(write, [CHATS[2], blank])), "--json")
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.stdout)
    assert summary["rows"]["train"] == {"": 1}
    assert summary["warnings"] == ["dropped 1 rows with an empty 'messages' field"]


def test_first_chat_losses_agree_across_backends(write, tmp_path):
    """Both backends train from the same examples and collate, so the multi-turn masks are shared: same losses."""
    pytest.importorskip("mlx.core", reason="parity needs both backends")
    pytest.importorskip("torch", reason="the CUDA backend needs torch")
    pytest.importorskip("peft", reason="the CUDA backend needs peft")
    from trmlx import run as runner
    from trmlx.report import read_log

    recipe = chat_files(write, CHATS, '[peft]\nmethod = "lora"\nrank = 4\nalpha = 8\ndropout = 0.0\n'
                                      '[train]\nsteps = 2\nbatch_size = 2\nlog_every = 1\neval_every = 0\n'
                                      'save_every = 0\nwarmup_steps = 0\nlr = 1e-2\nseed = 0\n')
    losses = {}
    for backend in ("mlx", "cuda"):
        setup = runner.resolve_run(str(recipe), backend, [], str(tmp_path / backend), None)
        runner.train(setup, backend)
        losses[backend] = [r["loss"] for r in read_log(tmp_path / backend / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses["mlx"]) == 2
    for ours, theirs in zip(losses["mlx"], losses["cuda"]):
        assert abs(ours - theirs) / abs(ours) < 1e-3, (losses)


def test_prompt_completion_rows_load_too(write, tiny_tokenizer):
    """The other non-default causal layout was dropped the same way (an empty 'source' built from no template)."""
    write("pc.jsonl", [{"prompt": "hello world", "completion": "merhaba dünya"}])
    recipe = load_recipe(write("r.toml", '[model]\npath = "m"\n[data]\ntrain = "pc.jsonl"\n'))
    data = prepare_data(recipe)
    assert [r.fields["completion"] for r in data.train] == ["merhaba dünya"] and not data.report.warnings()
    assert format_example(data.train[0], recipe, tiny_tokenizer) == ("hello world", "merhaba dünya")
