"""Chunked cross-entropy for T5 / mT5 (train.loss_chunk_size): the head over the decoder's target rows only, chunk
by chunk, gives the unchunked loss and the adapter's gradients within 1e-5 relative in fp32 on both backends, with
padded targets, for an untied mT5 head and a tied T5 head (the d_model**-0.5 scaling); both backends' chunked
losses agree; the planner counts one chunk of logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.test_chunked_loss import CHUNK, relative, unchunked_and_chunked
from trmlx.backend import get_backend
from trmlx.data import prepare_data
from trmlx.data.examples import collate, tokenize, with_loss_rows
from trmlx.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "seq2seq_quickstart.toml"
TINY = REPO / "recipes" / "models" / "tiny-mt5-tr"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The untied tiny mT5, and the same weights as a T5 whose head is the shared embedding (T5 v1.0's layout:
    transformers and t5.py then scale the decoder states by d_model**-0.5)."""
    from safetensors.numpy import load_file, save_file

    tied = tmp_path_factory.mktemp("tied-t5")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, tied / name)
    config = json.loads((TINY / "config.json").read_text())
    config.update(model_type="t5", architectures=["T5ForConditionalGeneration"], tie_word_embeddings=True)
    (tied / "config.json").write_text(json.dumps(config))
    weights = load_file(str(TINY / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(tied / "model.safetensors"), metadata={"format": "pt"})
    return {"untied": TINY, "tied": tied}


def seq2seq(backend: str, model: Path, method: str = "lora"):
    recipe = load_recipe(RECIPE, [f"model.path={json.dumps(str(model))}", f"train.loss_chunk_size={CHUNK}",
                                  f"peft.method={json.dumps(method)}", "peft.num_virtual_tokens=4",
                                  "peft.dropout=0.0"], backend=backend)
    loaded = get_backend(backend).load(recipe)
    examples, _ = tokenize(prepare_data(recipe).train[:6], recipe, loaded.tokenizer)
    batch = collate(examples, loaded.tokenizer.pad_token_id, loaded.handle["decoder_start_id"])
    assert (batch["mask"] == 0).any() and (batch["mask"] == 1).sum() > CHUNK  # padded targets are masked
    return loaded, batch


CASES = [("untied", "lora"), ("tied", "lora"), ("untied", "prompt")]


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
@pytest.mark.parametrize("variant,method", CASES)
def test_t5_chunked_loss_and_gradients_equal_the_unchunked(models, variant, method, backend):
    pytest.importorskip("mlx.core" if backend == "mlx" else "peft")
    loaded, batch = seq2seq(backend, models[variant], method)
    model = loaded.model
    assert loaded.handle["loss_chunk"] == CHUNK
    if backend == "mlx":
        assert ("lm_head" in getattr(model, "base", model)) == (variant == "untied")
    (full, count, full_grads), (chunked, chunked_count, chunked_grads) = unchunked_and_chunked(backend, model, batch)
    assert count == chunked_count == batch["mask"].sum()
    assert abs(chunked / full - 1) < 1e-5
    assert full_grads.keys() == chunked_grads.keys() and full_grads
    for name, grad in full_grads.items():
        if method == "prompt":  # peft's rows n..2n-1 (the decoder's half) get exactly zero gradient
            grad, chunked_grads[name] = grad[:4], chunked_grads[name][:4]
        assert relative(chunked_grads[name], grad) < 1e-5, name


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_chunked_t5_losses_agree_across_backends(models, variant):
    """Fresh LoRA adapters (B = 0) leave the base model: both backends' chunked losses of the same batch agree."""
    pytest.importorskip("mlx.core")
    pytest.importorskip("peft")
    import mlx.core as mx

    from trmlx.backends.cuda.train import to_torch
    from trmlx.backends.cuda.train import token_loss as torch_loss
    from trmlx.backends.mlx.train import to_mx
    from trmlx.backends.mlx.train import token_loss as mlx_loss

    losses = {}
    for backend in ("mlx", "cuda"):
        loaded, batch = seq2seq(backend, models[variant])
        arrays = with_loss_rows(batch, CHUNK)
        if backend == "mlx":
            loss, count = mlx_loss(loaded.model, to_mx(arrays))
            mx.eval(loss)
        else:
            loss, count = torch_loss(loaded.model, to_torch(arrays))
            loss = loss.detach()  # the training path, with its graph; only the value is compared
        losses[backend] = float(loss) / float(count)
    assert losses["mlx"] == pytest.approx(losses["cuda"], rel=1e-5)


def test_t5_prefix_tuning_keeps_the_unchunked_loss():
    """peft's T5 prefix tuning feeds past key/values to the decoder: the head is not split off."""
    pytest.importorskip("peft")
    from trmlx.loop import chunked_loss

    recipe = load_recipe(RECIPE, [f"train.loss_chunk_size={CHUNK}", 'peft.method="prefix"',
                                  "peft.num_virtual_tokens=4"], backend="cuda")
    assert get_backend("cuda").load(recipe).handle["loss_chunk"] == 0
    assert not chunked_loss("mt5", "prefix") and chunked_loss("mt5", "prompt") and chunked_loss("t5", "lora")
    assert not chunked_loss("llama", "prompt")


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_the_seq2seq_planner_counts_one_chunk_of_logits(backend):
    """mT5's 250,112-word vocabulary at 8 × 512 target tokens: one chunk's logits plus the target rows' decoder
    states, a fraction of the unchunked term."""
    from trmlx.plan.base import make_target
    from trmlx.plan.seq2seq import CALIBRATION, Seq2SeqShape, plan_memory

    config = {**json.loads((TINY / "config.json").read_text()), "vocab_size": 250112, "d_model": 256, "d_kv": 64}

    def logits_term(chunk: int, method: str = "lora") -> float:
        recipe = load_recipe(RECIPE, [f"train.loss_chunk_size={chunk}", f"peft.method={json.dumps(method)}",
                                      "peft.num_virtual_tokens=4"], backend=backend)
        shape = Seq2SeqShape.from_config(config)
        plan = plan_memory(recipe, backend, shape, make_target(recipe, backend, shape, "cpu"), batch_size=8,
                           seq_len=128, target_len=512)
        return next(t.bytes for t in plan.terms if t.name == "logits_loss")

    unchunked, chunked = logits_term(0), logits_term(128)
    coef = CALIBRATION["mlx" if backend == "mlx" else "torch"]["chunk_fp32"]
    assert chunked == pytest.approx(128 * 250112 * 4 * coef + 2 * 4096 * 256 * 4)
    assert chunked <= unchunked / 8
    assert logits_term(128, "prompt") == chunked  # prompt tuning leaves the decoder's positions alone
