"""The MLX T5 (backends/mlx/t5.py) against transformers in fp32: tiny random T5 v1.0 (ReLU, tied head) and mT5
(gated-GELU, untied head, a deeper decoder) — logits, greedy generation, the KV cache and LoRA targets."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="the MLX backend needs mlx (pip install 'trmlx[mlx]')")
torch = pytest.importorskip("torch", reason="the parity check needs torch (pip install 'trmlx[cuda]')")
transformers = pytest.importorskip("transformers", reason="the parity check needs transformers")

from trmlx.errors import UserError  # noqa: E402
from trmlx.recipe.schema import PeftConfig  # noqa: E402

IDS = np.array([[13, 45, 77, 190, 12, 9, 51, 33, 8, 120, 64, 2],
                [40, 8, 8, 120, 64, 2, 17, 0, 0, 0, 0, 0],      # right padding
                [99, 7, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
MASK = (np.arange(IDS.shape[1])[None, :] < np.array([[12], [7], [3]])).astype(np.int64)
DECODER_IDS = np.array([[0, 5, 17, 99, 3, 140, 6, 6, 71],
                        [0, 44, 2, 190, 18, 18, 30, 1, 11],
                        [0, 150, 61, 25, 7, 7, 7, 88, 2]])


def randomise(model, seed: int) -> None:
    """transformers' T5 init makes a tiny random model repeat one token; spread the weights so the outputs (and
    greedy paths) depend on the input, the positions and every layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            elif name in ("shared.weight", "lm_head.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
            else:
                gain = 3.0 if name.endswith((".o.weight", ".wo.weight")) else 1.0
                p.copy_(gain * p.shape[1] ** -0.5 * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module")
def v10(tmp_path_factory):
    """T5 v1.0 style: ReLU wi/wo, the head tied to `shared` (stored once) with the d_model**-0.5 output scale."""
    config = transformers.T5Config(vocab_size=200, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                   feed_forward_proj="relu", dropout_rate=0.1)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    randomise(model, 0)
    path = tmp_path_factory.mktemp("t5") / "v10"
    model.save_pretrained(str(path))
    return path, model


@pytest.fixture(scope="module")
def mt5(tmp_path_factory):
    """mT5 style: gated-GELU wi_0/wi_1/wo, its own lm_head and no output scale, inner dim ≠ d_model, 2 encoder and
    3 decoder blocks; the checkpoint also stores the encoder/decoder embed_tokens duplicates, as older files do."""
    from safetensors.torch import load_file, save_file

    config = transformers.MT5Config(vocab_size=256, d_model=48, d_kv=16, d_ff=96, num_layers=2,
                                    num_decoder_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
                                    dropout_rate=0.1)
    torch.manual_seed(1)
    model = transformers.MT5ForConditionalGeneration(config).eval()
    randomise(model, 1)
    path = tmp_path_factory.mktemp("t5") / "mt5"
    model.save_pretrained(str(path))
    # transformers 5 always ties mT5's head when it builds one; real mT5 checkpoints carry a separate lm_head.
    weights = load_file(str(path / "model.safetensors"))
    weights["lm_head.weight"] = 0.3 * torch.randn(weights["shared.weight"].shape, generator=torch.Generator()
                                                  .manual_seed(7))
    weights["encoder.embed_tokens.weight"] = weights["decoder.embed_tokens.weight"] = weights["shared.weight"]
    save_file({k: v.contiguous().clone() for k, v in weights.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    config_json = json.loads((path / "config.json").read_text())
    config_json["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(config_json))
    reference = transformers.MT5ForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    assert not torch.equal(reference.lm_head.weight, reference.shared.weight)
    return path, reference


@pytest.fixture(params=["v10", "mt5"])
def pair(request):
    """(folder, transformers model, MLX model) for each variant."""
    from trmlx.backends.mlx.t5 import load_t5

    path, reference = request.getfixturevalue(request.param)
    model, _ = load_t5(path)
    return path, reference, model


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def torch_logits(model, ids=IDS, mask=MASK, decoder_ids=DECODER_IDS) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(decoder_ids)).logits.numpy()


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention
    from trmlx.backends.mlx.t5 import relative_position_bucket

    positions = np.arange(-1500, 1501)
    for buckets, distance in ((32, 128), (8, 20), (16, 32), (64, 256)):
        for bidirectional in (True, False):
            theirs = T5Attention._relative_position_bucket(torch.tensor(positions), bidirectional=bidirectional,
                                                           num_buckets=buckets, max_distance=distance).numpy()
            ours = relative_position_bucket(positions, bidirectional, buckets, distance)
            np.testing.assert_array_equal(ours, theirs)


def test_loader_reads_the_head_and_the_scaling(v10, mt5):
    from mlx.utils import tree_flatten
    from trmlx.backends.mlx.t5 import load_t5

    model, config = load_t5(v10[0])
    assert (model.args.tie_word_embeddings, model.args.scale_decoder_outputs, model.args.is_gated) == (True, True,
                                                                                                         False)
    assert "lm_head" not in model and not model.training and config["feed_forward_proj"] == "relu"
    model, _ = load_t5(mt5[0])
    assert (model.args.tie_word_embeddings, model.args.scale_decoder_outputs, model.args.is_gated) == (False, False,
                                                                                                         True)
    assert (len(model.encoder.block), len(model.decoder.block)) == (2, 3)
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert {"shared.weight", "lm_head.weight", "decoder.block.0.layer.1.EncDecAttention.k.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "decoder.block.2.layer.2.DenseReluDense.wi_1.weight", "encoder.final_layer_norm.weight"} <= names
    assert not any("embed_tokens" in n for n in names)


def test_logits_match_transformers(pair):
    _, reference, model = pair
    theirs = torch_logits(reference)
    ours = np.array(model(mx.array(IDS), mx.array(MASK), mx.array(DECODER_IDS)))
    assert relative_error(ours, theirs) < 1e-4
    # The encoder states agree at the real (unpadded) positions too.
    with torch.no_grad():
        encoder_theirs = reference.encoder(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK))[0].numpy()
    encoder_ours = np.array(model.encode(mx.array(IDS), mx.array(MASK)))
    keep = MASK.astype(bool)
    assert relative_error(encoder_ours[keep], encoder_theirs[keep]) < 1e-4
    # Padding is invisible: a row alone and unpadded gives the same logits as inside the padded batch.
    alone = np.array(model(mx.array(IDS[2:, :3]), None, mx.array(DECODER_IDS[2:])))
    assert relative_error(alone[0], ours[2]) < 1e-5


def test_greedy_generation_matches_transformers(pair):
    from trmlx.backends.mlx.t5_generate import generate_greedy

    _, reference, model = pair
    steps = 12

    def hf_generate(eos: int) -> list[list[int]]:
        # use_cache=False: transformers 5.23 sizes its decoder cache by num_layers, which breaks a decoder deeper
        # than the encoder; without the cache every step is a full decoder pass (an independent reference anyway).
        out = reference.generate(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), do_sample=False,
                                 num_beams=1, max_new_tokens=steps, decoder_start_token_id=0, eos_token_id=eos,
                                 pad_token_id=0, use_cache=False).tolist()
        rows = [row[1:] for row in out]
        return [row[: row.index(eos)] if eos in row else row for row in rows]

    # Make EOS a token the model does produce mid-sequence in row 0, so rows stop at different steps.
    eos = hf_generate(eos=1)[0][2]
    expected = hf_generate(eos=eos)
    assert len({len(row) for row in expected}) > 1 and min(len(r) for r in expected) < steps
    ours = generate_greedy(model, mx.array(IDS), mx.array(MASK), max_new_tokens=steps, decoder_start_id=0,
                           eos_id=eos)
    assert ours == expected
    ragged = [list(row[: int(m.sum())]) for row, m in zip(IDS, MASK)]  # lists are right-padded for us
    assert generate_greedy(model, ragged, max_new_tokens=steps, decoder_start_id=0, eos_id=eos) == expected


def test_incremental_decoding_equals_the_full_pass(mt5):
    from trmlx.backends.mlx.t5 import load_t5

    model, _ = load_t5(mt5[0])
    mask = mx.array(MASK)
    states = model.encode(mx.array(IDS), mask)
    full = np.array(model.decode(mx.array(DECODER_IDS), states, mask))
    cache = model.make_cache()
    pieces = [model.decode(mx.array(DECODER_IDS[:, :3]), states, mask, cache)]  # a chunk, then token by token
    cross = cache[0].cross
    for t in range(3, DECODER_IDS.shape[1]):
        pieces.append(model.decode(mx.array(DECODER_IDS[:, t:t + 1]), states, mask, cache))
    assert cache[0].cross is cross and cache.offset == DECODER_IDS.shape[1]  # cross K/V computed once
    stepped = np.array(mx.concatenate(pieces, axis=1))
    assert relative_error(stepped, full) < 1e-5


def _randomise_lora(model, seed: int = 0) -> None:
    from mlx.utils import tree_flatten, tree_unflatten

    mx.random.seed(seed)
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.2) for k, v in
                                 tree_flatten(model.trainable_parameters()) if k.endswith(("lora_a", "lora_b"))]))


def test_lora_adapts_encoder_and_decoder_blocks_like_peft(mt5, tmp_path):
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from trmlx.backends.mlx.adapters import apply_lora, peft_config, save_adapter
    from trmlx.backends.mlx.t5 import load_t5

    path, reference = mt5
    model, _ = load_t5(path)
    base = np.array(model(mx.array(IDS), mx.array(MASK), mx.array(DECODER_IDS)))
    peft = PeftConfig(targets=["q", "v", "wi_0", "wi_1"], rank=4, alpha=8, dropout=0.0)
    adapted = apply_lora(model, peft)
    expected = sorted(
        [f"encoder.block.{i}.layer.0.SelfAttention.{n}" for i in range(2) for n in "qv"]
        + [f"encoder.block.{i}.layer.1.DenseReluDense.{n}" for i in range(2) for n in ("wi_0", "wi_1")]
        + [f"decoder.block.{i}.layer.{j}.{a}.{n}" for i in range(3)
           for j, a in ((0, "SelfAttention"), (1, "EncDecAttention")) for n in "qv"]
        + [f"decoder.block.{i}.layer.2.DenseReluDense.{n}" for i in range(3) for n in ("wi_0", "wi_1")])
    assert adapted == expected
    assert len(model.layers) == 3 and not any(k.startswith("layers") for k, _ in tree_flatten(model.parameters()))
    trainable = {k.rsplit(".", 1)[-1] for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == {"lora_a", "lora_b"}

    _randomise_lora(model)
    ours = np.array(model(mx.array(IDS), mx.array(MASK), mx.array(DECODER_IDS)))
    assert relative_error(ours, base) > 1e-2

    # Gradients reach the adapters of both stacks through the training forward.
    def loss_fn(m):
        logits = m(mx.array(IDS), mx.array(MASK), mx.array(DECODER_IDS))
        return mx.mean(nn.losses.cross_entropy(logits, mx.array(IDS[:, :9])))

    _, grads = nn.value_and_grad(model, loss_fn)(model)
    norms = {k: float(mx.abs(g).max()) for k, g in tree_flatten(grads)}
    assert all(v > 0 for v in norms.values()) and len(norms) == 2 * len(expected)

    # The same adapter in PEFT over transformers' mT5 gives the same logits.
    peft_lib = pytest.importorskip("peft", reason="the PEFT parity check needs peft")
    save_adapter(model, tmp_path / "adapter", peft_config(peft, model, str(path), task_type="SEQ_2_SEQ_LM"))
    theirs = peft_lib.PeftModel.from_pretrained(reference, str(tmp_path / "adapter")).eval()
    try:
        assert relative_error(torch_logits(theirs), ours) < 1e-4
    finally:
        theirs.unload()  # leave the shared reference model unadapted for other tests


def test_lora_last_layers_and_wi_target(v10, mt5):
    from trmlx.backends.mlx.adapters import apply_lora
    from trmlx.backends.mlx.t5 import load_t5

    model, _ = load_t5(mt5[0])  # 2 encoder + 3 decoder blocks: the last block index exists only in the decoder
    assert apply_lora(model, PeftConfig(targets=["o"], layers=1)) == [
        "decoder.block.2.layer.0.SelfAttention.o", "decoder.block.2.layer.1.EncDecAttention.o"]
    model, _ = load_t5(mt5[0])
    assert apply_lora(model, PeftConfig(targets=["wo"], layers=2)) == [
        "decoder.block.1.layer.2.DenseReluDense.wo", "decoder.block.2.layer.2.DenseReluDense.wo",
        "encoder.block.1.layer.1.DenseReluDense.wo"]

    model, _ = load_t5(v10[0])
    assert apply_lora(model, PeftConfig(targets=["wi"])) == [
        f"{stack}.block.{i}.layer.{j}.DenseReluDense.wi" for stack, j in (("decoder", 2), ("encoder", 1))
        for i in range(2)]

    model, _ = load_t5(mt5[0])
    with pytest.raises(UserError) as err:
        apply_lora(model, PeftConfig(targets=["q", "wi"]))
    assert err.value.problems == [("peft.targets: 'wi' matches no linear layer of this model; its linear layers "
                                   "are k, o, q, v, wi_0, wi_1, wo")]


def test_gated_silu_with_config_scaling_flag(tmp_path):
    """feed_forward_proj 'gated-silu'; transformers 5 writes `scale_decoder_outputs: false` next to a tied head (it
    always ties T5's head now), and the loader follows that flag rather than guessing from the head."""
    from trmlx.backends.mlx.t5 import load_t5

    config = transformers.T5Config(vocab_size=200, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=2,
                                   feed_forward_proj="gated-silu", tie_word_embeddings=False)
    torch.manual_seed(2)
    reference = transformers.T5ForConditionalGeneration(config).eval()
    randomise(reference, 2)
    reference.save_pretrained(str(tmp_path / "silu"))
    model, saved = load_t5(tmp_path / "silu")
    assert saved["scale_decoder_outputs"] is False and "lm_head" not in model
    assert not model.args.scale_decoder_outputs and model.args.is_gated
    ours = np.array(model(mx.array(IDS), mx.array(MASK), mx.array(DECODER_IDS)))
    assert relative_error(ours, torch_logits(reference)) < 1e-4
