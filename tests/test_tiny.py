"""The offline tiny Llama: loads in transformers and mlx-lm with matching logits, is reproducible byte for byte,
and its tokenizer round-trips Turkish and formats chats."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from trmlx.tiny.llama import build_tiny_llama, shipped_texts
from trmlx.tiny.tokenizer import train_tokenizer

MODEL = REPO / "recipes" / "models" / "tiny-llama-tr"
DATA = REPO / "recipes" / "data" / "en_tr"
TURKISH = "İstanbul'da ışık, ğ ş ç ö ü ı İ"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(shipped_texts(DATA))


def test_transformers_and_mlx_lm_load_it_with_the_same_logits():
    torch = pytest.importorskip("torch")
    mx = pytest.importorskip("mlx.core")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, info = AutoModelForCausalLM.from_pretrained(MODEL, output_loading_info=True)
    assert hf.dtype == torch.float32
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    model, mlx_tok = mlx_utils.load(str(MODEL))  # (model, TokenizerWrapper); no hub: the path exists
    ids = AutoTokenizer.from_pretrained(MODEL)("The cat sat. " + TURKISH).input_ids
    assert ids[0] == 1 and mlx_tok.encode("The cat sat. " + TURKISH) == ids
    with torch.no_grad():
        expected = hf.eval()(torch.tensor([ids])).logits[0].numpy()
    got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    assert got.shape == expected.shape == (len(ids), 1024)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4


def test_rebuild_is_byte_identical_to_the_committed_model(tmp_path):
    out = build_tiny_llama(tmp_path / "m", shipped_texts(DATA))
    committed = sorted(p.name for p in MODEL.iterdir())
    assert committed == sorted(p.name for p in out.iterdir())
    assert committed == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    for name in committed:
        assert (out / name).read_bytes() == (MODEL / name).read_bytes(), name
    assert sum((MODEL / n).stat().st_size for n in committed) < 2_000_000


def test_tokenizer_round_trips_turkish_and_formats_chats(tokenizer):
    ids = tokenizer(TURKISH).input_ids
    assert ids[0] == tokenizer.bos_token_id == 1 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == TURKISH
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, len(tokenizer)) == (0, 2, 3, 1024)
    chat = [{"role": "user", "content": "Translate: good morning"}, {"role": "assistant", "content": "günaydın"}]
    text = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>\nTranslate: good morning</s>\n<|assistant|>\n"
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    assert full == "<s><|user|>\nTranslate: good morning</s>\n<|assistant|>\ngünaydın</s>\n"
    prompt_ids = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True)
    prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids  # 5.x: BatchEncoding
    assert prompt_ids[0] == 1 and prompt_ids.count(1) == 1  # BOS once: the template adds it, encoding does not


def test_tokenizer_training_is_order_independent(tokenizer):
    texts = shipped_texts(DATA)
    again = train_tokenizer(list(reversed(texts)))
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_building_imports_neither_torch_nor_mlx(tmp_path):
    code = ("import sys; from trmlx.tiny.llama import main; main([sys.argv[1]]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlx', 'mlx_lm')))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (MODEL / "model.safetensors").read_bytes()
